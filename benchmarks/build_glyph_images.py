"""Build a real image-classification set from this machine's fonts: glyphs labelled by writing system.

Each image is one letter of one script (Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic)
or a mathematical operator, drawn with one of the DejaVu faces installed by Debian's ``fonts-dejavu``
(sans, serif, mono; bold, oblique, condensed, light), at a random size, position, slight rotation and
random ink and paper colours, 64x64 px. Latin, Greek and Cyrillic share many shapes (A/Α/А, P/Ρ/Р),
so the task is not solved by a glance. A glyph a face lacks (it would draw the .notdef box) is
skipped. Nothing is committed: rebuild the set on any Debian machine with

    python benchmarks/build_glyph_images.py --out benchmarks/data/glyphs
"""

from __future__ import annotations

import argparse
import glob
import random
from pathlib import Path

SCRIPTS = {
    "latin": [*range(0x41, 0x5B), *range(0x61, 0x7B)],
    "greek": [*range(0x391, 0x3A2), *range(0x3A3, 0x3AA), *range(0x3B1, 0x3CA)],
    "cyrillic": [*range(0x410, 0x450)],
    "armenian": [*range(0x531, 0x557), *range(0x561, 0x587)],
    "georgian": [*range(0x10D0, 0x10F1)],
    "hebrew": [*range(0x5D0, 0x5EB)],
    "arabic": [*range(0x627, 0x63B), *range(0x641, 0x64B)],
    "math": [*range(0x2200, 0x2270)],
}


def main() -> None:
    from PIL import Image, ImageChops, ImageDraw, ImageFont

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/glyphs"))
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    faces = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf"))
    if not faces:
        raise SystemExit("No DejaVu fonts in /usr/share/fonts/truetype/dejavu; `apt-get install fonts-dejavu-core`.")
    faces = [f for f in faces if "Math" not in f]

    def has_glyph(font: ImageFont.FreeTypeFont, char: str) -> bool:
        missing = font.getmask(chr(0xE000))  # private use: every face draws .notdef for it
        mask = font.getmask(char)
        if mask.size == (0, 0) or mask.getbbox() is None:
            return False
        if mask.size != missing.size:
            return True
        return ImageChops.difference(Image.frombytes("L", mask.size, bytes(mask)),
                                     Image.frombytes("L", missing.size, bytes(missing))).getbbox() is not None

    for script, points in SCRIPTS.items():
        folder = args.out / script
        folder.mkdir(parents=True, exist_ok=True)
        made = tries = 0
        while made < args.per_class and tries < args.per_class * 20:
            tries += 1
            face = rng.choice(faces)
            size = rng.randint(26, 46)
            font = ImageFont.truetype(face, size)
            char = chr(rng.choice(points))
            if not has_glyph(font, char):
                continue
            paper = tuple(rng.randint(150, 255) for _ in range(3))
            ink = tuple(rng.randint(0, 110) for _ in range(3))
            canvas = Image.new("RGB", (96, 96), paper)
            draw = ImageDraw.Draw(canvas)
            draw.text((48 + rng.randint(-8, 8), 48 + rng.randint(-8, 8)), char, font=font, fill=ink, anchor="mm")
            canvas = canvas.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, fillcolor=paper)
            canvas.crop((16, 16, 80, 80)).save(folder / f"{made:04d}.png")
            made += 1
        print(f"{script}: {made} images")


if __name__ == "__main__":
    main()
