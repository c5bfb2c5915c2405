"""Build a real text-classification set from this machine's English manual pages.

Each row is one manual page's one-line summary (the text after ``\\-`` in its NAME section, e.g.
"list directory contents"), labelled by the manual section it lives in: 1 user commands, 2 system
calls, 3 library functions, 5 file formats, 7 overviews and conventions, 8 administration. The page
names are left out (``pthread_*`` would give section 3 away), so the classifier must read the
summary: "open and possibly create a file" (2) against "open a stream" (3) is a hard call. Pages come
from /usr/share/man/man{1,2,3,5,7,8}; at most ``--per-class`` summaries per section, drawn with a
fixed seed; duplicates and summaries shorter than three words are dropped. Nothing is committed:
rebuild the set on any Debian machine with

    python benchmarks/build_manpage_text.py --out benchmarks/data/manpages.csv
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import re
from pathlib import Path

SECTIONS = {"1": "user-command", "2": "system-call", "3": "library-function", "5": "file-format",
            "7": "overview", "8": "administration"}
_ROFF = re.compile(r"\\f[BIRP]|\\\(.. ?|\\[&|^e]|\\\*\(..|\\\*.")


def summary(path: Path) -> str | None:
    """The NAME line's description, roff escapes removed; None when the page has none."""
    try:
        raw = gzip.open(path, "rt", errors="replace").read(20_000)
    except (OSError, EOFError):
        return None
    match = re.search(r"^\.S[Hh]\s+\"?(NAME|Name)\"?\s*\n(.*?)(?=^\.S[Hh]\s)", raw, re.S | re.M)
    if not match:
        return None
    body = " ".join(line for line in match.group(2).splitlines() if not line.startswith((".\\\"", "'\\\"")))
    body = re.sub(r"^\.[A-Za-z]+\s*", "", body)
    body = body.replace("\\-", "\x00", 1)
    if "\x00" not in body:
        return None
    text = _ROFF.sub("", body.split("\x00", 1)[1]).replace("\\", "").strip()
    text = re.sub(r"\s+", " ", re.sub(r"(^|\s)\.[A-Za-z]+\s", " ", text))
    return text if len(text.split()) >= 3 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/manpages.csv"))
    parser.add_argument("--per-class", type=int, default=450)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, label in SECTIONS.items():
        pages = sorted(Path(f"/usr/share/man/man{number}").glob("*.gz"))
        rng.shuffle(pages)
        kept = 0
        for page in pages:
            text = summary(page)
            if text is None or text.lower() in seen:
                continue
            seen.add(text.lower())
            rows.append((text, label))
            kept += 1
            if kept >= args.per_class:
                break
        print(f"section {number} ({label}): {kept} summaries from {len(pages)} pages")
    rng.shuffle(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
