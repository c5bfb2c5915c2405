"""``ImageModality``: ingest image folders, resize and normalise per backbone card, cut timm models."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.data.dataset import LabelledData
from lepton_automl.exceptions import DataError
from lepton_automl.interfaces import Modality, ModelParts
from lepton_automl.log import get_logger
from lepton_automl.training.trainer import TupleOut

logger = get_logger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
# Input resolution is one of the strongest latency knobs; digits do not need 224 px.
IMAGE_SIZES = (64, 96, 128, 160, 192, 224)


def load_rgb(example: Any, size: int | Sequence[int]) -> np.ndarray:
    """Decode one image (path or uint8 array) to an RGB float array of shape (H, W, 3) in [0, 1].

    ``size`` is one side of a square, or ``(height, width)``.
    """
    from PIL import Image

    if isinstance(example, np.ndarray):
        img = Image.fromarray(example)
    else:
        img = Image.open(example)
        img.seek(0)  # first frame of animated GIF/WebP
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    img = img.convert("RGB").resize((width, height), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


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
    return all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "global_pool"))


class ImageModality(Modality):
    name = "image"
    tasks = ("classification",)
    description = "Image folders (one subfolder per class) with timm backbones"

    # -- ingest ----------------------------------------------------------------------------
    def can_load(self, source: Any) -> bool:
        if isinstance(source, str) and source.startswith("demo:"):
            return True
        if not isinstance(source, (str, Path)) or not Path(source).is_dir():
            return False
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(source).glob("*/*"))

    def load(self, source: Any, *, options: Mapping[str, Any] | None = None) -> LabelledData:
        from lepton_automl.data.demo import resolve_demo

        if isinstance(source, str) and source.startswith("demo:"):
            source = resolve_demo(source)
        root = Path(source)
        if not root.is_dir():
            raise DataError(f"Image folder {str(root)!r} does not exist or is not a folder.")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(
                f"{str(root)!r} has no class subfolders. Lay images out as ROOT/<class>/<image>.png."
            )
        examples: list[str] = []
        labels: list[int] = []
        unreadable: list[str] = []
        for label, cls in enumerate(classes):
            for path in sorted(_walk_images(root / cls)):
                if _readable(path):
                    examples.append(str(path))
                    labels.append(label)
                else:
                    unreadable.append(str(path))
        report: list[str] = []
        if unreadable:
            report.append(f"skipped {len(unreadable)} unreadable images (first: {unreadable[0]})")
            logger.warning("%s: %s", root, report[-1])
        if not examples:
            raise DataError(f"{str(root)!r} holds no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        present = sorted(set(labels))
        if len(present) < 2:
            raise DataError(f"{str(root)!r} has images for a single class; classification needs two.")
        return LabelledData(
            examples=tuple(examples),
            labels=np.array(labels),
            classes=tuple(classes),
            name=root.name,
            report=tuple(report),
        )

    # -- search space ----------------------------------------------------------------------
    def _sizes(self, card: BackboneCard) -> list[int]:
        native = card.input_size[-1] if card.input_size else 224
        return [s for s in IMAGE_SIZES if s <= native] or [native]

    def suggest(self, trial: Any, card: BackboneCard) -> dict[str, Any]:
        return {"data__image_size": trial.suggest_categorical("data__image_size", list(IMAGE_SIZES))}

    def default_params(self, card: BackboneCard) -> dict[str, Any]:
        return {"data__image_size": self._sizes(card)[-1]}

    def warm_start_variants(self, card: BackboneCard) -> list[dict[str, Any]]:
        sizes = self._sizes(card)
        return [{"data__image_size": s} for s in (sizes[-1], 128, 96) if s in sizes]

    # -- model -----------------------------------------------------------------------------
    def max_finetune_blocks(self, card: BackboneCard) -> int:
        return 2 if card.scheme in ("timm",) else 0

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
        dim = int(getattr(model, "num_features", 0) or _probe_dim(model, params))
        if finetune_blocks <= 0:
            return ModelParts(trunk=TupleOut(model), tail=nn.Identity(), feature_dim=dim)
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

    def encode(
        self, examples: Sequence[Any], *, preprocessing: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        size = preprocessing["image_size"]
        size = int(size) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
        mean = np.asarray(preprocessing["mean"], dtype=np.float32)
        std = np.asarray(preprocessing["std"], dtype=np.float32)
        batch = np.stack([load_rgb(e, size) for e in examples])
        batch = (batch - mean) / std
        return {"pixel_values": np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)}

    def input_names(self) -> tuple[str, ...]:
        return ("pixel_values",)


def _probe_dim(model: nn.Module, params: Mapping[str, Any]) -> int:
    size = int(params.get("data__image_size", 64))
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, size, size)).shape[-1])


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, following symlinks once (a symlink loop is not followed twice)."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for fn in filenames:
            if Path(fn).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / fn)
    return found


def _readable(path: Path) -> bool:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
        return True
    except Exception:
        return False
