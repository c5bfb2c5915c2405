"""Build a real text-classification set from this machine's Debian archive index.

Each row is one Debian package's one-line description, labelled by the package's archive section
(games, science, sound, ...). Package names are left out: they give the answer away (``python3-*``,
``lib*-dev``). The source is apt's own ``Packages`` index in /var/lib/apt/lists (read with
``apt-helper cat-file``, which undoes its compression), so the set is rebuilt the same way on any
Debian machine and is never committed.

    python benchmarks/build_debian_text.py --out benchmarks/data/debian_sections.csv
"""

from __future__ import annotations

import argparse
import csv
import glob
import random
import subprocess
from pathlib import Path

SECTIONS = ("admin", "games", "graphics", "net", "science", "sound", "text", "x11")


def read_packages() -> list[dict[str, str]]:
    lists = sorted(glob.glob("/var/lib/apt/lists/*_binary-*_Packages*"))
    if not lists:
        raise SystemExit("No apt Packages index in /var/lib/apt/lists; run `apt-get update` first.")
    records: list[dict[str, str]] = []
    for path in lists:
        text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], check=True,
                              capture_output=True, text=True).stdout
        for block in text.split("\n\n"):
            fields = {}
            for line in block.splitlines():
                if line and not line.startswith(" ") and ":" in line:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            if "Package" in fields:
                records.append(fields)
    return records


def build(out: Path, *, per_class: int, seed: int) -> int:
    rng = random.Random(seed)
    by_section: dict[str, list[str]] = {s: [] for s in SECTIONS}
    seen: set[str] = set()
    for rec in read_packages():
        section = rec.get("Section", "").split("/")[-1]
        desc = rec.get("Description", "").strip()
        if section in by_section and desc and desc.lower() not in seen:
            seen.add(desc.lower())
            by_section[section].append(desc)
    rows = []
    for section, descs in by_section.items():
        rng.shuffle(descs)
        rows.extend((d, section) for d in descs[:per_class])
    rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "debian_sections.csv")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = build(args.out, per_class=args.per_class, seed=args.seed)
    print(f"wrote {n} rows to {args.out}")


if __name__ == "__main__":
    main()
