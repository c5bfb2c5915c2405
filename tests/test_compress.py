"""`lepton compress` and each compression mode's round trip: compress, save, reload, same predictions.

A search trial's export is the input. Every compressed folder is reloaded two ways: by its runtime
(ONNX Runtime file, or the torch runtime re-applied to the safetensors weights) and as the fp32
torch model rebuilt from the safetensors; both must agree, within a tolerance that depends on the mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.cli import app
from lepton_automl.compression.compress import compress_export
from lepton_automl.compression.pruning import find_encoder_layers
from lepton_automl.cost.hardware import CostModel, load_profiles
from lepton_automl.data.split import split_data
from lepton_automl.exceptions import ConfigError, DataError, ExportError
from lepton_automl.export.artifact import Predictor, load_metadata, rebuild_model
from lepton_automl.search.objective import TrialRunner
from lepton_automl.search.probe_export import materialize
from lepton_automl.search.space import SearchSpace
from lepton_automl.training.cache import FeatureCache
from lepton_image import ImageModality
from lepton_text import TextModality


def _export(modality, data, registry, root: Path, params: dict) -> Path:
    profiles = load_profiles()
    runner = TrialRunner(modality=modality, registry=registry, splits=split_data(modality.load(data), seed=0),
                         space=SearchSpace(backbones=(params["backbone"],)), cache=FeatureCache(root / "cache"),
                         cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]), run_dir=root)
    runner.evaluate(params, trial_dir=root / "export", seed=0)
    return materialize(root / "export", modality=modality, registry=registry)


@pytest.fixture(scope="module")
def image_export(image_folder, tmp_path_factory) -> Path:
    params = {"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "probe",
              "optim__weight_decay": 1e-4, "prune__method": "none", "quant__mode": "none"}
    return _export(ImageModality(), image_folder, BackboneRegistry(), tmp_path_factory.mktemp("img"), params)


@pytest.fixture(scope="module")
def text_registry(tiny_bert_dir) -> BackboneRegistry:
    registry = BackboneRegistry()
    registry.register(BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local"))
    return registry


@pytest.fixture(scope="module")
def text_export(text_csv, text_registry, tmp_path_factory) -> Path:
    params = {"backbone": "tiny", "data__max_length": 32, "train__mode": "finetune", "train__blocks": 1,
              "train__epochs": 2, "optim__lr": 1e-3, "optim__weight_decay": 1e-4, "prune__method": "none",
              "quant__mode": "none"}
    return _export(TextModality(), text_csv, text_registry, tmp_path_factory.mktemp("txt"), params)


def _logits_two_ways(folder: Path, examples: list) -> tuple[np.ndarray, np.ndarray]:
    """(runtime logits as served, fp32 torch logits of the model rebuilt from safetensors)."""
    predictor = Predictor(folder)
    served = predictor.logits(examples)
    model = rebuild_model(folder)
    feeds = predictor.modality.encode(examples, preprocessing=predictor.preprocessing)
    with torch.no_grad():
        fp32 = model(*[torch.from_numpy(feeds[n]) for n in predictor.meta["input_names"]]).numpy()
    return served, fp32


def _examples(modality, data) -> list:
    return list(split_data(modality.load(data), seed=0).validation.examples)


@pytest.mark.parametrize("prune, quant", [
    (0.0, "int8"),     # static QDQ int8 for a convolutional graph
    (0.3, "none"),     # channels removed + recovery: the ONNX file is the pruned model
    (0.3, "int8"),
])
def test_image_compression_round_trips(image_export, image_folder, tmp_path, prune, quant) -> None:
    result = compress_export(image_export, data=image_folder, out=tmp_path / "c", prune=prune, quant=quant,
                             recovery_epochs=1)
    meta = load_metadata(tmp_path / "c")
    assert meta["runtime_file"] == ("model.int8.onnx" if quant == "int8" else "model.onnx")
    assert meta["metrics"]["accuracy"] == result.after.accuracy
    if prune:
        assert result.after.params_m < 0.8 * result.before.params_m
    # Every image of the folder (36), not the 6-image validation split: int8 promises logits close to
    # fp32 relative to their spread, not identical argmaxes (close calls flip, and differently on
    # CPUs with and without VNNI). Measured here: mean error 0.05 (unpruned) and 0.20 (pruned) of
    # the logits' standard deviation, correlation 0.998 and 0.965.
    served, fp32 = _logits_two_ways(tmp_path / "c", sorted(str(p) for p in image_folder.rglob("*.png")))
    if quant == "none":
        np.testing.assert_allclose(served, fp32, atol=1e-3, rtol=1e-3)
    else:
        assert float(np.abs(served - fp32).mean()) <= 0.35 * float(fp32.std())
        assert float(np.corrcoef(served.ravel(), fp32.ravel())[0, 1]) >= 0.9
    assert 0 < result.after.latency_ms < 10_000 and result.after.latency_serving_batch_ms > 0
    assert result.after.serving_batch == 32


@pytest.mark.parametrize("prune, quant", [(0.5, "none"), (0.0, "int8"), (0.0, "torch-int8"), (0.5, "torch-int8"),
                                          (0.0, "torch-bf16")])
def test_text_compression_round_trips(text_export, text_csv, text_registry, tmp_path, prune, quant) -> None:
    result = compress_export(text_export, data=text_csv, out=tmp_path / "c", prune=prune, quant=quant,
                             recovery_epochs=1, registry=text_registry)
    meta = load_metadata(tmp_path / "c")
    assert meta["runtime"] == (quant if quant.startswith("torch") else "onnxruntime")
    served, fp32 = _logits_two_ways(tmp_path / "c", _examples(TextModality(), text_csv))
    tolerance = {"none": 1e-4, "int8": 0.15, "torch-int8": 0.15, "torch-bf16": 0.1}[quant]
    np.testing.assert_allclose(served, fp32, atol=tolerance * max(1.0, float(np.abs(fp32).max())))
    if prune:
        model = rebuild_model(tmp_path / "c")
        layers = find_encoder_layers(model)
        assert [layer.attention.self.num_attention_heads for layer in layers] == [1, 1]  # 2 heads -> 1
        assert [layer.intermediate.dense.out_features for layer in layers] == [32, 32]  # 64 -> 32
        assert result.after.params_m < result.before.params_m


def test_a_pruned_export_can_be_compressed_again(text_export, text_csv, text_registry, tmp_path) -> None:
    compress_export(text_export, data=text_csv, out=tmp_path / "once", prune=0.5, recovery_epochs=1,
                    registry=text_registry)
    compress_export(tmp_path / "once", data=text_csv, out=tmp_path / "twice", quant="torch-int8",
                    registry=text_registry)
    assert load_metadata(tmp_path / "twice")["params"]["prune__heads"] == \
        load_metadata(tmp_path / "once")["params"]["prune__heads"]
    served, fp32 = _logits_two_ways(tmp_path / "twice", _examples(TextModality(), text_csv))
    assert float((served.argmax(1) == fp32.argmax(1)).mean()) >= 0.9


def test_compress_refuses_bad_requests(image_export, image_folder, text_csv, tmp_path) -> None:
    with pytest.raises(ConfigError, match="Nothing to do"):
        compress_export(image_export, data=image_folder, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="Unknown --quant 'int4'"):
        compress_export(image_export, data=image_folder, out=tmp_path / "a", quant="int4")
    with pytest.raises(ConfigError, match="new folder"):
        compress_export(image_export, data=image_folder, out=image_export, quant="int8")
    with pytest.raises(ExportError, match="not a Lepton export"):
        compress_export(tmp_path, data=image_folder, out=tmp_path / "a", quant="int8")
    renamed = tmp_path / "shapes2"
    import shutil

    shutil.copytree(image_folder, renamed)
    (renamed / "disc").rename(renamed / "circle")
    with pytest.raises(DataError, match="not trained on: \\['circle'\\]"):
        compress_export(image_export, data=renamed, out=tmp_path / "a", quant="int8")


def test_compress_command_prints_before_and_after(image_export, image_folder, tmp_path) -> None:
    result = CliRunner().invoke(app, ["compress", str(image_export), "--data", str(image_folder), "--prune", "0.3",
                                      "--quant", "int8", "--recovery-epochs", "1", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output and "validation accuracy" in result.output
    predicted = CliRunner().invoke(app, ["predict", str(tmp_path / "c"), str(next(image_folder.rglob("*.png")))])
    assert predicted.exit_code == 0, predicted.output


def test_a_pruned_models_linear_head_is_refit_to_its_features(image_export, image_folder) -> None:
    from torch import nn

    from lepton_automl.compression.pipeline import prune_structure, refit_head
    from lepton_automl.interfaces import ExportModel, Standardize, TupleOut
    from lepton_automl.training.finetune import evaluate_accuracy

    modality = ImageModality()
    splits = split_data(modality.load(image_folder), seed=0)
    prep = Predictor(image_export).preprocessing
    model = rebuild_model(image_export).eval()
    prune_structure(model, kind="channels", amount=0.5, example=modality.encode(splits.train.examples[:1],
                                                                                 preprocessing=prep))
    with torch.no_grad():  # a head that no longer fits its features: every logit 0, class 0 predicted
        model.head[-1].weight.zero_()
        model.head[-1].bias.zero_()
    before = evaluate_accuracy(model, modality, splits.train, prep)
    assert before == pytest.approx(float((splits.train.labels == 0).mean()))
    assert refit_head(model, modality=modality, data=splits.train, preprocessing=prep, seed=0)
    assert isinstance(model.head[0], Standardize) and isinstance(model.head[-1], nn.Linear)
    after = evaluate_accuracy(model, modality, splits.train, prep)
    assert after >= 0.8 and after > before + 0.3, (before, after)
    # a build_fn's own network has no separate linear head: nothing to refit, nothing changed
    net = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    user = ExportModel(TupleOut(net), nn.Identity(), nn.Identity())
    assert not refit_head(user, modality=modality, data=splits.train, preprocessing=prep, seed=0)
