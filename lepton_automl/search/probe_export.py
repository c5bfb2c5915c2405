"""A linear probe trial's files: its head and a recipe, not a model. ``materialize`` turns them into a
full export folder (safetensors + ONNX + model card) when the trial is on the front or asked for.

The recipe names the trunk store entry the probe was scored on; the ONNX files are that entry's
trunk with the probe's head appended (``export/compose.py``), so the written model computes exactly
what was scored. The folder is written beside the trial's and renamed into place: a crash leaves the
recipe, never half a model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.exceptions import ExportError
from lepton_automl.export.artifact import METADATA, card_from_dict, card_to_dict, save_artifact
from lepton_automl.export.compose import append_linear_head
from lepton_automl.interfaces import ConcatTrunk, ExportModel, Modality, Standardize, build_seeded
from lepton_automl.log import get_logger

logger = get_logger(__name__)

RECIPE = "probe.json"
HEAD = "probe-head.safetensors"


def write_recipe(trial_dir: Path, *, head: torch.nn.Module, trunk: Path, quant: str, modality: Modality,
                 cards: Sequence[BackboneCard], params: Mapping[str, Any], classes: Sequence[str],
                 preprocessing: Mapping[str, Any], metrics: Mapping[str, Any], pretrained: bool, seed: int,
                 name: str, data: Mapping[str, Any] | None = None, search: Mapping[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    trial_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(trial_dir / HEAD))
    recipe = {"trunk": str(Path(trunk).resolve()), "quant": quant, "modality": modality.name,
              "cards": [card_to_dict(c) for c in cards], "params": dict(params), "classes": list(map(str, classes)),
              "preprocessing": dict(preprocessing), "metrics": dict(metrics), "pretrained": pretrained, "seed": seed,
              "name": name,
              "data": dict(data or {}), "search": dict(search or {})}
    (trial_dir / RECIPE).write_text(json.dumps(recipe, indent=2, default=str))
    return trial_dir


def is_recipe(directory: str | Path) -> bool:
    return (Path(directory) / RECIPE).is_file() and not (Path(directory) / METADATA).is_file()


def can_materialize(directory: str | Path) -> bool:
    """Whether ``directory`` holds an export, or a recipe whose trunk store entry still exists (a
    finished worker removes its trunk store once its front is written)."""
    directory = Path(directory)
    if (directory / METADATA).is_file():
        return True
    try:
        recipe = json.loads((directory / RECIPE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (Path(recipe["trunk"]) / "trunk.onnx").is_file()


def load_head(path: Path) -> torch.nn.Sequential:
    from safetensors.torch import load_file

    state = load_file(str(path))
    classes, width = state["1.weight"].shape
    head = torch.nn.Sequential(Standardize(torch.zeros(width), torch.ones(width)), torch.nn.Linear(width, classes))
    head.load_state_dict(state, strict=True)
    return head.eval()


def materialize(trial_dir: str | Path, *, modality: Modality | None = None,
                registry: BackboneRegistry | None = None) -> Path:
    """Write the export folder of a probe trial in place of its recipe (a no-op for a full folder)."""
    trial_dir = Path(trial_dir)
    if (trial_dir / METADATA).is_file():
        return trial_dir
    if not (trial_dir / RECIPE).is_file():
        raise ExportError(f"{str(trial_dir)!r} holds neither a Lepton export nor a probe recipe; rerun the search "
                          "to recreate the trial's files.")
    try:  # read everything first: another worker may write this export at the same time
        recipe = json.loads((trial_dir / RECIPE).read_text())
        head = load_head(trial_dir / HEAD)
    except FileNotFoundError:
        if (trial_dir / METADATA).is_file():
            return trial_dir  # it did
        raise
    trunk = Path(recipe["trunk"])
    if not (trunk / "trunk.onnx").is_file():
        raise ExportError(f"The trunk this probe was scored on ({trunk}) is gone (a finished search removes its "
                          "trunk store unless --keep-all-artifacts). Rerun the search with the same study to "
                          "recreate it.")
    if modality is None:
        from lepton_automl.plugins import MODALITIES, PluginRegistry

        modality = PluginRegistry(MODALITIES).load(recipe["modality"])()
    registry = registry or BackboneRegistry()
    cards = [card_from_dict(c) for c in recipe["cards"]]
    built = [build_seeded(modality, c, registry, params=recipe["params"], finetune_blocks=0,
                          pretrained=bool(recipe["pretrained"]), seed=int(recipe["seed"])) for c in cards]
    trunk_module = built[0].trunk if len(built) == 1 else ConcatTrunk([p.trunk for p in built])
    model = ExportModel(trunk_module, torch.nn.Identity(), head).eval()

    work = trial_dir.with_name(trial_dir.name + f".export{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        fp32 = append_linear_head(trunk / "trunk.onnx", work / "model.onnx", head)
        runtime = fp32 if recipe["quant"] == "none" else append_linear_head(
            trunk / "trunk.int8.onnx", work / "model.int8.onnx", head)
        save_artifact(work, model=model, fp32_onnx=fp32, runtime_onnx=runtime, modality=modality, card=cards[0],
                      members=cards if len(cards) > 1 else None, params=recipe["params"], classes=recipe["classes"],
                      preprocessing=recipe["preprocessing"], finetune_blocks=0, metrics=recipe["metrics"],
                      name=recipe["name"], data=recipe.get("data"), search=recipe.get("search"))
        if (trial_dir / METADATA).is_file():  # another worker finished first: keep theirs
            shutil.rmtree(work, ignore_errors=True)
            return trial_dir
        old = trial_dir.with_name(trial_dir.name + f".old{os.getpid()}")
        os.replace(trial_dir, old)
        os.replace(work, trial_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.debug("wrote the export of %s", trial_dir)
    return trial_dir
