"""The bundled demo: scikit-learn's digits (1,797 real 8x8 handwritten digits) as an image folder.

scikit-learn ships the data inside its wheel, so the demo works offline. The images are written
once as 8-bit grayscale PNGs, one folder per class, so that the demo goes through the same
image-folder ingest path as a user's own data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lepton_automl.log import get_logger

logger = get_logger(__name__)

DEMOS = ("digits",)


def default_cache_dir() -> Path:
    root = os.environ.get("LEPTON_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lepton_automl"
    )
    return Path(root)


def materialize_digits(root: str | Path | None = None) -> Path:
    """Write digits to ``root/digits/<label>/<index>.png`` (once) and return the folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(root or default_cache_dir() / "demo") / "digits"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    digits = load_digits()
    # Values run 0..16; stretch to 0..255 so the PNGs are ordinary 8-bit images.
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images, digits.target)):
        out = folder / str(int(label))
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(out / f"{i:04d}.png")
    marker.write_text("ok\n")
    logger.info("wrote the digits demo (%d images) to %s", len(images), folder)
    return folder


def resolve_demo(source: str) -> Path:
    """``demo:digits`` -> the demo's folder."""
    name = source.partition(":")[2]
    if name == "digits":
        return materialize_digits()
    from lepton_automl.exceptions import DataError

    raise DataError(f"Unknown demo {source!r}. Available: {', '.join('demo:' + d for d in DEMOS)}.")
