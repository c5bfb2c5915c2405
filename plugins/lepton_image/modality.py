"""``ImageModality``: ingest image folders, resize and normalise per backbone card, cut timm models."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.data.dataset import LabelledData
from lepton_automl.exceptions import DataError, InputError
from lepton_automl.interfaces import InputLimits, Modality, ModelParts, TupleOut
from lepton_automl.log import get_logger

logger = get_logger(__name__)

# Every raster format Pillow decodes that image collections use: desktop pixmaps are often XPM or ICO,
# scans TIFF, netpbm tools write PPM/PGM/PBM.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".xpm", ".ico", ".ppm",
                  ".pgm", ".pbm", ".tga"}
# Vector images are not decoded: a user with them is told how to rasterise them.
VECTOR_SUFFIXES = {".svg", ".svgz"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
               "test": "test"}
# Input resolution is one of the strongest latency knobs; digits do not need 224 px.
IMAGE_SIZES = (64, 96, 128, 160, 192, 224)


def load_rgb(example: Any, size: int | Sequence[int]) -> np.ndarray:
    """Decode one image (path or uint8 array) to an RGB float array of shape (H, W, 3) in [0, 1].

    ``size`` is one side of a square, or ``(height, width)``.
    """
    return load_rgb_uint8(example, size).astype(np.float32) / 255.0


def load_rgb_uint8(example: Any, size: int | Sequence[int]) -> np.ndarray:
    """``load_rgb`` before the scaling to [0, 1]: uint8 of shape (H, W, 3)."""
    if isinstance(example, np.ndarray):
        img = Image.fromarray(example)
    else:
        img = Image.open(example)
        img.seek(0)  # first frame of animated GIF/WebP
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return np.asarray(to_rgb(img).resize((width, height), Image.BICUBIC))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white and 16-bit images scaled to 8 bits."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """An uploaded image's bytes as an RGB uint8 array; ``InputError`` for what is not a whole image or
    has more than ``max_pixels`` pixels (checked from the header, before any pixel is decoded)."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise InputError(f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                             f"{max_pixels:,}", status=413)
        img.seek(0)
        img.load()
        return np.asarray(to_rgb(img), dtype=np.uint8)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"the image is too large to decode safely ({exc})", status=413) from None
    except Exception as exc:
        raise InputError(f"not a readable image ({type(exc).__name__}: {str(exc)[:200]}); send PNG, JPEG, GIF, "
                         "BMP, TIFF, WebP, ICO or XPM bytes") from None


class _Flatten(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)


def _flat_blocks(model: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for stage in model.blocks:
        blocks.extend(stage if isinstance(stage, nn.Sequential) else [stage])
    return blocks


def _cuttable(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool"))


# Stages whose pooled outputs join the frozen features (besides the pooled head), counted from the end.
POOLED_STAGES = 4


class PooledStages(nn.Module):
    """An EfficientNet-layout model whose features are the global-average-pooled outputs of its last
    ``stages`` stages and of its head, concatenated: ``(pixel_values,) -> (features,)``.

    Mid-level features transfer better than the last layer's alone to images unlike the pretraining
    data (Evci et al., "Head2Toe", ICML 2022). A linear probe with its L2 strength cross-validated on
    them, lite0 at 224 px: glyphs 0.643 -> 0.659 (test 0.644 -> 0.688), digits 0.959 -> 0.978. They
    cost nothing at inference: the stages run anyway, and pooling is a mean. The model is held as
    ``module``, as in ``TupleOut``, so the two share state-dict keys.
    """

    def __init__(self, model: nn.Module, *, stages: int = POOLED_STAGES) -> None:
        super().__init__()
        self.module = model
        self.first = max(0, len(model.blocks) - int(stages))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        m = self.module
        h = m.bn1(m.conv_stem(x))
        pooled = []
        for i, stage in enumerate(m.blocks):
            h = stage(h)
            if i >= self.first:
                pooled.append(h.mean(dim=(2, 3)))
        pooled.append(m.global_pool(m.bn2(m.conv_head(h))).flatten(1))
        return (torch.cat(pooled, dim=1),)


class ImageModality(Modality):
    def __init__(self) -> None:
        self._cuttable: dict[str, bool] = {}

    name = "image"
    tasks = ("classification",)
    description = "Image folders (one subfolder per class) with timm backbones"
    features_version = 1  # 1: pooled outputs of the last stages beside the pooled head (PooledStages)

    # -- ingest ----------------------------------------------------------------------------
    def can_load(self, source: Any) -> bool:
        if isinstance(source, str) and source.startswith("demo:"):
            return True
        if not isinstance(source, (str, Path)) or not Path(source).is_dir():
            return False
        # vector images too, so that a folder of them is told how to rasterise them (``load``)
        return any(p.suffix.lower() in IMAGE_SUFFIXES | VECTOR_SUFFIXES for p in Path(source).glob("*/*"))

    def load(self, source: Any, *, options: Mapping[str, Any] | None = None) -> LabelledData:
        """Read ``ROOT/<class>/<image>`` (or ``ROOT/{train,validation,test}/<class>/<image>``),
        checking every file: see ``lepton data check``."""
        from lepton_automl.data.checks import assemble
        from lepton_automl.data.demo import resolve_demo
        from lepton_automl.data.findings import Findings

        options = dict(options or {})
        if isinstance(source, str) and source.startswith("demo:"):
            source = resolve_demo(source)
        root = Path(source)
        if not root.exists():
            raise DataError(f"Image folder {str(root)!r} does not exist. Check the path.")
        if not root.is_dir():
            raise DataError(f"{str(root)!r} is a file; give a folder with one subfolder per class.")
        findings = Findings(str(root), strict=bool(options.get("strict")))
        layout = [(SPLIT_NAMES[d.name], d) for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLIT_NAMES]
        if not any(split == "train" for split, _ in layout):
            layout = [("", root)]
        examples: list[str] = []
        labels: list[str] = []
        keys: list[str] = []
        split_of: list[str] = []
        bad: dict[str, list[str]] = {"unreadable": [], "oversized": []}
        converted: Counter[str] = Counter()
        loops = ignored = vectors = 0
        for split, base in layout:
            classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise DataError(
                    f"{str(base)!r} has no class subfolders. Lay images out as ROOT/<class>/<image>.png."
                )
            for cls in classes:
                files, n_loops, n_other, n_vector = _walk_images(base / cls)
                loops += n_loops
                ignored += n_other
                vectors += n_vector
                if not files:
                    findings.warning("empty-class", f"class folder {str(base / cls)!r} holds no images; ignored")
                for path in files:
                    status, mode, digest = _inspect(path)
                    if status != "ok":
                        bad[status].append(str(path))
                        continue
                    if mode != "RGB":
                        converted[mode] += 1
                    examples.append(str(path))
                    labels.append(cls)
                    keys.append(digest)
                    split_of.append(split)
        for status, paths in bad.items():
            first = paths[0] if paths else ""
            findings.fixed(status, len(paths), (
                f"skipped {len(paths)} unreadable or truncated images (first: {first})" if status == "unreadable"
                else f"refused {len(paths)} images over the decompression-bomb limit of "
                     f"{Image.MAX_IMAGE_PIXELS:,} pixels (first: {first})"))
        modes = ", ".join(f"{m}: {n}" for m, n in sorted(converted.items()))
        notes = [note for modes_with, note in ((("RGBA", "LA", "PA", "P"), "transparency composited on white"),
                                               (("I;16", "I;16B", "I;16L", "I"), "16-bit scaled to 8-bit"))
                 if any(m in converted for m in modes_with)]
        findings.fixed("converted", sum(converted.values()),
                       f"converted {sum(converted.values())} images to RGB when decoding ({modes})"
                       + (f"; {', '.join(notes)}" if notes else ""))
        findings.fixed("not-an-image", ignored, f"ignored {ignored} files that are not images "
                       f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        findings.fixed("vector-image", vectors, f"ignored {vectors} vector images (.svg, .svgz): Lepton decodes raster "
                       "images only; rasterise them first, e.g. `rsvg-convert -w 128 -h 128 icon.svg -o icon.png`")
        findings.fixed("symlink-loop", loops, f"did not follow {loops} symlink loops")
        if not examples:
            raise DataError(
                f"{str(root)!r} holds no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}). "
                + "; ".join(str(f) for f in findings.items)
            )
        return assemble(examples=examples, labels=labels, keys=keys, findings=findings, name=root.name,
                        split_of=split_of if layout[0][0] else ())

    # -- search space ----------------------------------------------------------------------
    def _sizes(self, card: BackboneCard) -> list[int]:
        native = card.input_size[-1] if card.input_size else 224
        return [s for s in IMAGE_SIZES if s <= native] or [native]

    def suggest(self, trial: Any, card: BackboneCard) -> dict[str, Any]:
        return {"data__image_size": trial.suggest_categorical("data__image_size", list(IMAGE_SIZES))}

    def default_params(self, card: BackboneCard) -> dict[str, Any]:
        return {"data__image_size": self._sizes(card)[-1]}

    def full_finetune_variant(self, card: BackboneCard) -> dict[str, Any]:
        # Training at 224 px costs about 3x 128 px; on 2 CPU cores 128 px fits a few epochs in minutes.
        return {"data__image_size": 128 if 128 in self._sizes(card) else self._sizes(card)[-1]}

    def warm_start_variants(self, card: BackboneCard) -> list[dict[str, Any]]:
        sizes = self._sizes(card)
        return [{"data__image_size": s} for s in (sizes[-1], 128, 96) if s in sizes]

    # -- model -----------------------------------------------------------------------------
    def max_finetune_blocks(self, card: BackboneCard) -> int:
        """2 for timm models with the EfficientNet layout this plugin cuts (stem, blocks, conv_head,
        bn2, pooling); others (ResNet, ConvNeXt, MobileNetV3) are probed or fully fine-tuned only."""
        if card.scheme != "timm":
            return 0
        if card.name not in self._cuttable:
            import timm

            with torch.device("meta"):  # the layout only: no weights, no memory
                self._cuttable[card.name] = _cuttable(timm.create_model(card.target, pretrained=False,
                                                                        num_classes=0, **card.build_kwargs))
        return 2 if self._cuttable[card.name] else 0

    def build(
        self,
        card: BackboneCard,
        registry: BackboneRegistry,
        *,
        params: Mapping[str, Any],
        finetune_blocks: int = 0,
        pretrained: bool = True,
    ) -> ModelParts:
        model = registry.load(card, pretrained=pretrained)
        model.eval()
        if finetune_blocks <= 0:
            trunk = PooledStages(model) if _cuttable(model) else TupleOut(model)
            return ModelParts(trunk=trunk, tail=nn.Identity(), feature_dim=_probe_dim(trunk))
        # The pooled output's width: timm's num_features is the width before a head such as
        # MobileNetV3's conv_head (576 where the output is 1024), so measure it.
        dim = _probe_dim(TupleOut(model))
        if not _cuttable(model):
            raise DataError(
                f"Backbone {card.name!r} cannot be cut for partial fine-tuning; use train__mode=probe."
            )
        blocks = _flat_blocks(model)
        k = min(finetune_blocks, len(blocks))
        trunk = nn.Sequential(model.conv_stem, model.bn1, *blocks[:-k])
        tail = nn.Sequential(*blocks[-k:], model.conv_head, model.bn2, _Flatten(model.global_pool))
        return ModelParts(trunk=TupleOut(trunk), tail=tail, feature_dim=dim)

    # -- preprocessing ---------------------------------------------------------------------
    def preprocessing(
        self, card: BackboneCard, registry: BackboneRegistry, *, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        size = params.get("data__image_size") or self.default_params(card)["data__image_size"]
        return {
            "image_size": int(size) if isinstance(size, (int, float)) else [int(v) for v in size],
            "mean": list(card.mean or (0.485, 0.456, 0.406)),
            "std": list(card.std or (0.229, 0.224, 0.225)),
            "interpolation": "bicubic",
        }

    def read_inputs(self, items: Sequence[str]) -> list[Any]:
        """Image files, and folders (every image under them, sorted)."""
        out: list[Any] = []
        for item in items:
            path = Path(item)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                if not found:
                    raise DataError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {item!r}.")
                out.extend(str(p) for p in found)
            elif path.is_file():
                out.append(str(path))
            else:
                raise DataError(f"{item!r} is neither an image file nor a folder of images. Check the path.")
        return out

    def decode_input(self, value: bytes | str, *, limits: InputLimits) -> np.ndarray:
        """Upload bytes, or a base64 string in JSON (a ``data:image/...;base64,`` prefix is allowed)."""
        if isinstance(value, str):
            import base64
            import binascii

            text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
            try:
                value = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise InputError("an image in JSON must be a base64 string (optionally a data: URL); this one "
                                 "is not valid base64") from None
        return decode_image(value, max_pixels=limits.max_pixels)

    def encode(
        self, examples: Sequence[Any], *, preprocessing: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        # Decoded as uint8 (``encode_compact``) and converted once, in place: (x / 255 - mean) / std as
        # x * a - b. A quarter of the memory traffic of converting each image to float first: a batch of
        # 256 glyphs at 224 px was encoded in half the time on one core.
        out = self.encode_compact(examples, preprocessing=preprocessing)["pixel_values"].astype(np.float32)
        scale, offset = _affine(preprocessing)
        out *= scale[None, :, None, None]
        out -= offset[None, :, None, None]
        return {"pixel_values": out}

    def encode_compact(
        self, examples: Sequence[Any], *, preprocessing: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """uint8 pixels, channels first: a quarter of ``encode``'s bytes to hand from a decoding worker."""
        size = preprocessing["image_size"]
        size = int(size) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
        pixels = np.stack([load_rgb_uint8(e, size) for e in examples])
        return {"pixel_values": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))}

    def expand(self, inputs: Mapping[str, torch.Tensor], *, preprocessing: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        pixels = inputs["pixel_values"]
        if pixels.dtype != torch.uint8:
            return dict(inputs)
        scale, offset = (torch.from_numpy(a).to(pixels.device)[None, :, None, None] for a in _affine(preprocessing))
        return {"pixel_values": pixels.float().mul_(scale).sub_(offset)}

    def input_names(self) -> tuple[str, ...]:
        return ("pixel_values",)


def _affine(preprocessing: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel: (x / 255 - mean) / std == x * scale - offset."""
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    return (1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32)


def _probe_dim(trunk: nn.Module) -> int:
    with torch.no_grad():  # the pooled width does not depend on the input size; 64 px is cheap
        return int(trunk(torch.zeros(1, 3, 64, 64))[0].shape[-1])


def _walk_images(folder: Path) -> tuple[list[Path], int, int, int]:
    """Image files under ``folder`` (symlinks followed once), symlink loops met, other files ignored,
    vector images ignored."""
    found: list[Path] = []
    seen: set[str] = set()
    loops = other = vectors = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            loops += 1
            continue
        seen.add(real)
        dirnames.sort()
        for fn in sorted(filenames):
            suffix = Path(fn).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / fn)
            elif suffix in VECTOR_SUFFIXES:
                vectors += 1
            elif not fn.startswith("."):
                other += 1
    return found, loops, other, vectors


def _inspect(path: Path) -> tuple[str, str, str]:
    """("ok" | "unreadable" | "oversized", the image mode, a digest of the file's bytes)."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                mode = img.mode
                img.verify()
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # a full decode: verify() alone misses truncated pixel data
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "oversized", "", ""
    except Exception:
        return "unreadable", "", ""
    return "ok", mode, hashlib.sha1(data).hexdigest()
