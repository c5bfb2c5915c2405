"""The probe path: one trunk export, quantization and measurement per trunk signature, one probe fit per
feature set, a head and a recipe per trial, and model files written only when asked for, computing
exactly what was scored."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.exceptions import ExportError
from lepton_automl.export.artifact import Predictor, load_metadata, rebuild_model
from lepton_automl.search import probe_trial
from lepton_automl.search.early_stopping import EarlyStopping, StopCheck, TrialStopped
from lepton_automl.search.probe_export import RECIPE, is_recipe, materialize
from lepton_automl.search.retired import STOPPED_FP32_ATTR, STOPPED_SLOWER_ATTR
from lepton_image import ImageModality
from tests.test_pruning_in_search import _runner

BASE = {"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "probe", "prune__method": "none"}


@pytest.fixture(scope="module")
def probed(image_folder, tmp_path_factory):
    """Three probe trials on one backbone and size: fp32, int8, and int8 again (another trial number)."""
    root = tmp_path_factory.mktemp("probes")
    modality = ImageModality()
    runner = _runner(modality, modality.load(image_folder), BackboneRegistry(), root, "efficientnet_lite0")
    results = {name: runner.evaluate({**BASE, "quant__mode": quant}, trial_dir=root / name, seed=seed)
               for name, quant, seed in (("fp32", "none", 0), ("int8", "int8", 1), ("int8-again", "int8", 2))}
    return runner, root, results


def test_probes_share_one_fit_per_feature_set_and_one_trunk_per_signature(probed) -> None:
    runner, root, results = probed
    fp32, int8, again = results["fp32"], results["int8"], results["int8-again"]
    assert not fp32.extra["cache_hit"] and int8.extra["cache_hit"]
    # The int8 trial reused the fp32 features but built (quantized, ran, timed) its own trunk; the trial
    # after it on the same signature built nothing.
    assert fp32.extra["trunk_built"] and int8.extra["trunk_built"] and not again.extra["trunk_built"]
    # One cross-validated fit, whatever the trial quantizes and whatever its seed.
    assert fp32.extra["cv_accuracy"] == int8.extra["cv_accuracy"] == again.extra["cv_accuracy"]
    assert fp32.extra["probe_l2"] == int8.extra["probe_l2"]
    # fp32: the objective is the cross-validated accuracy; int8: minus what quantization cost on validation.
    assert fp32.accuracy == pytest.approx(fp32.extra["cv_accuracy"])
    assert int8.accuracy == pytest.approx(int8.extra["cv_accuracy"] + int8.extra["holdout_accuracy"]
                                          - fp32.extra["holdout_accuracy"])
    # Two trunk signatures (fp32, int8) for three trials; the third reused the second's measurement.
    store = runner.probes.trunks.root
    assert sorted(p.name for p in store.iterdir()) == sorted({fp32.extra["trunk"], int8.extra["trunk"]})
    assert again.extra["trunk"] == int8.extra["trunk"] and again.latency_ms == int8.latency_ms
    assert (store / int8.extra["trunk"] / "trunk.int8.onnx").is_file()
    # Each trial's wall time by step: the trunk's steps only where its entry was built.
    assert {"export", "quantization", "quantized features", "measurement"} <= set(int8.extra["stage_seconds"])
    assert {"export", "measurement"} <= set(fp32.extra["stage_seconds"])
    assert not {"export", "quantization", "measurement"} & set(again.extra["stage_seconds"])
    assert {"features", "probe fit (cv)", "scoring"} <= set(again.extra["stage_seconds"])


def test_an_int8_trunk_no_faster_than_its_fp32_twin_stops_before_running_the_splits(image_folder, tmp_path) -> None:
    """Early stopping judges an int8 probe once its trunk is quantized and timed: one no faster than its
    fp32 twin (batch 1 and serving batch) cannot reach the front, and its features are never computed;
    one faster on either count runs on."""
    modality = ImageModality()
    runner = _runner(modality, modality.load(image_folder), BackboneRegistry(), tmp_path, "efficientnet_lite0")
    fp32 = runner.evaluate({**BASE, "quant__mode": "none"}, trial_dir=tmp_path / "fp32", seed=0)
    store = runner.probes.trunks
    twin = store.get(fp32.extra["trunk"])
    timed = dict(twin.measured)

    def judge() -> StopCheck:
        return StopCheck(rule=EarlyStopping(), points=lambda: [], backbone=BASE["backbone"], quant="int8")

    # The fp32 entry holding a time no int8 trunk beats: the int8 trial stops once timed.
    twin.measured.update(latency_ms=timed["latency_ms"] / 1e3, throughput_per_s=timed["throughput_per_s"] * 1e3)
    stop = judge()
    with pytest.raises(TrialStopped, match="no faster than the fp32 trunk"):
        runner.evaluate({**BASE, "quant__mode": "int8"}, trial_dir=tmp_path / "int8", seed=1, stop=stop)
    assert stop.record[STOPPED_FP32_ATTR] == timed["latency_ms"] / 1e3 < stop.record[STOPPED_SLOWER_ATTR]
    assert [p.name for p in store.root.iterdir()] == [fp32.extra["trunk"]]  # no int8 entry was stored
    # Its real times: which way it goes depends on this CPU's int8 kernels (VNNI or not); the rule holds.
    twin.measured.update(timed)
    stop = judge()
    try:
        int8 = runner.evaluate({**BASE, "quant__mode": "int8"}, trial_dir=tmp_path / "int8", seed=1, stop=stop)
    except TrialStopped:
        assert stop.record[STOPPED_SLOWER_ATTR] >= stop.record[STOPPED_FP32_ATTR] == fp32.latency_ms
    else:
        assert not stop.record and int8.extra["trunk_built"]
        assert int8.latency_ms < fp32.latency_ms or int8.extra["throughput_per_s"] > fp32.extra["throughput_per_s"]
        assert {"measurement", "quantized features"} <= set(int8.extra["stage_seconds"])
    # The rule itself, on timings either way round.
    slow = {"latency_ms": 20.8, "throughput_per_s": 60.0}
    fast = {"latency_ms": 15.3, "throughput_per_s": 80.0}
    assert "cannot reach the front" in probe_trial.not_faster(slow, fast, quant="int8", serving_batch=32)
    assert probe_trial.not_faster(fast, slow, quant="int8", serving_batch=32) is None
    assert probe_trial.not_faster({**slow, "throughput_per_s": 90.0}, fast, quant="int8", serving_batch=32) is None


def test_a_probe_trial_writes_a_recipe_not_a_model(probed) -> None:
    _, root, _ = probed
    for name in ("fp32", "int8"):
        assert is_recipe(root / name)
        assert not list((root / name).glob("*.onnx")) and not (root / name / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_the_written_model_computes_what_the_trial_scored(probed, tmp_path, name) -> None:
    runner, root, results = probed
    trial = tmp_path / name
    shutil.copytree(root / name, trial)
    materialize(trial, modality=runner.modality, registry=runner.registry)
    assert not is_recipe(trial)
    meta = load_metadata(trial)
    assert meta["runtime_file"] == ("model.onnx" if name == "fp32" else "model.int8.onnx")
    predictor = Predictor(trial)
    for split, expected in (("validation", results[name].extra["holdout_accuracy"]),
                            ("test", results[name].test_accuracy)):
        data = getattr(runner.splits, split)
        served = predictor.logits(list(data.examples)).argmax(1)
        assert float((served == data.labels).mean()) == pytest.approx(expected)
    # The safetensors weights are the same model as the fp32 ONNX file.
    model = rebuild_model(trial)
    feeds = runner.modality.encode(list(runner.splits.validation.examples), preprocessing=predictor.preprocessing)
    with torch.no_grad():
        torch_logits = model(*[torch.from_numpy(feeds[n]) for n in runner.modality.input_names()]).numpy()
    onnx_logits = Predictor(trial).session.run(["logits"], feeds)[0] if name == "fp32" else None
    if onnx_logits is not None:
        np.testing.assert_allclose(torch_logits, onnx_logits, atol=1e-3, rtol=1e-3)
    assert materialize(trial) == trial  # a written folder is left as it is


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_a_trunk_that_does_not_compute_the_cached_features_is_refused(probed, image_folder, tmp_path, quant) -> None:
    """Cached validation features that the exported trunk does not reproduce (here: scaled by 1.1) stop
    the trial before anything is measured or stored: fp32 through the logits of the very model that is
    timed, int8 through its fp32 export, before quantization."""
    runner, root, _ = probed
    shutil.copytree(runner.cache.root, tmp_path / "cache")
    for path in (tmp_path / "cache").glob("*/validation_0.npy"):
        np.save(path, np.load(path) * 1.1)
    modality = ImageModality()
    fresh = _runner(modality, modality.load(image_folder), BackboneRegistry(), tmp_path, "efficientnet_lite0")
    with pytest.raises(ExportError, match="differ from the cached ones"):
        fresh.evaluate({**BASE, "quant__mode": quant}, trial_dir=tmp_path / "trial", seed=0)
    assert not list(fresh.probes.trunks.root.glob("*/entry.json"))  # no entry stored
    # untouched features pass the same check, in a trunk store of their own
    shutil.copytree(runner.cache.root, tmp_path / "good" / "cache")
    ok = _runner(modality, modality.load(image_folder), BackboneRegistry(), tmp_path / "good", "efficientnet_lite0")
    assert ok.evaluate({**BASE, "quant__mode": quant}, trial_dir=tmp_path / "ok", seed=0).extra["cache_hit"]
    assert len(list(ok.probes.trunks.root.glob("*/entry.json"))) == 1


def test_a_recipe_whose_trunk_is_gone_says_how_to_recreate_it(probed, tmp_path) -> None:
    _, root, _ = probed
    trial = tmp_path / "orphan"
    shutil.copytree(root / "fp32", trial)
    recipe = json.loads((trial / RECIPE).read_text())
    recipe["trunk"] = str(tmp_path / "no-such-trunk")
    (trial / RECIPE).write_text(json.dumps(recipe))
    with pytest.raises(ExportError, match="is gone.*Rerun the search"):
        materialize(trial)
    assert is_recipe(trial)  # nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orphan"]


def test_the_model_card_follows_the_hub_layout_and_names_data_metrics_and_hardware(probed, tmp_path) -> None:
    import yaml

    runner, root, results = probed
    trial = tmp_path / "card"
    shutil.copytree(root / "fp32", trial)
    materialize(trial, modality=runner.modality, registry=runner.registry)
    text = (trial / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "onnxruntime" and meta["pipeline_tag"] == "image-classification"
    assert {"lepton-automl", "image", "onnx"} <= set(meta["tags"])
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["test accuracy"] == pytest.approx(results["fp32"].test_accuracy, abs=1e-4)
    # the probe was fit on train+validation: its held-out estimate is the cross-validated one
    assert metrics["cross-validated accuracy"] == pytest.approx(results["fp32"].extra["cv_accuracy"], abs=1e-4)
    assert "validation accuracy" not in metrics and "not held out" in body
    assert body.lstrip().startswith("# shapes image classifier\n")
    assert "An image classifier into 3 classes" in body
    splits = runner.splits
    assert f"split {len(splits.train)} train / {len(splits.validation)} validation / {len(splits.test)} test" in body
    assert "Training examples per class: disc " in body and "threads" in body
    assert "Pruning: none" in body and "Quantization: none" in body
    # Portable: nothing in the folder's metadata points at where it was written.
    assert str(root) not in (trial / "lepton.json").read_text() and str(tmp_path) not in text


def test_an_int8_ensemble_reuses_its_members_trunks_and_serves_what_it_scored(image_folder, tmp_path,
                                                                             monkeypatch) -> None:
    modality = ImageModality()
    runner = _runner(modality, modality.load(image_folder), BackboneRegistry(), tmp_path, "efficientnet_lite0")
    base = {"data__image_size": 64, "train__mode": "probe", "prune__method": "none", "quant__mode": "int8"}
    lite0 = runner.evaluate({"backbone": "efficientnet_lite0", **base}, trial_dir=tmp_path / "lite0", seed=0)
    both = runner.evaluate({"backbone": "efficientnet_lite0+efficientnet_lite1", **base}, trial_dir=tmp_path / "both",
                           seed=1)
    store = runner.probes.trunks
    # lite0's int8 entry was reused, lite1's was made for the ensemble: three entries in all.
    assert len(list(store.root.iterdir())) == 3
    members = [store.get(lite0.extra["trunk"])] + [store.get(p.name) for p in store.root.iterdir()
                                                   if p.name not in (lite0.extra["trunk"], both.extra["trunk"])]
    ensemble = store.get(both.extra["trunk"])
    np.testing.assert_array_equal(ensemble.features["validation"],
                                  np.concatenate([m.features["validation"] for m in members], axis=1))
    assert both.extra["gmacs"] > lite0.extra["gmacs"] and both.params_m > lite0.params_m
    materialize(tmp_path / "both", modality=modality, registry=runner.registry)
    assert load_metadata(tmp_path / "both")["runtime_file"] == "model.int8.onnx"
    for split, expected in (("validation", both.extra["holdout_accuracy"]), ("test", both.test_accuracy)):
        data = getattr(runner.splits, split)
        served = Predictor(tmp_path / "both").logits(list(data.examples)).argmax(1)
        assert float((served == data.labels).mean()) == pytest.approx(expected)
    # The same ensemble in fp32 copies the int8 entry's checked fp32 merge: nothing is merged again.
    merges = []
    real_merge = probe_trial.merge_side_by_side
    monkeypatch.setattr(probe_trial, "merge_side_by_side", lambda *a, **k: merges.append(a) or real_merge(*a, **k))
    fp32 = runner.evaluate({"backbone": "efficientnet_lite0+efficientnet_lite1", **base, "quant__mode": "none"},
                           trial_dir=tmp_path / "both-fp32", seed=2)
    assert merges == []
    assert (store.get(fp32.extra["trunk"]).fp32.read_bytes() == ensemble.fp32.read_bytes())
    materialize(tmp_path / "both-fp32", modality=modality, registry=runner.registry)
    served = Predictor(tmp_path / "both-fp32").logits(list(runner.splits.test.examples)).argmax(1)
    assert float((served == runner.splits.test.labels).mean()) == pytest.approx(fp32.test_accuracy)


def test_static_int8_calibrates_on_fewer_examples_of_large_inputs(tmp_path) -> None:
    """Calibration takes no more examples than hold CALIBRATION_VALUES input values: 8 at 224 px, 15 at
    160 px, all 32 at 96 px; the same seed draws the same examples, so the larger inputs' come first."""
    from lepton_automl.search.objective import CALIBRATION_EXAMPLES, CALIBRATION_VALUES
    from tests.conftest import make_image_folder

    modality, registry = ImageModality(), BackboneRegistry()
    runner = _runner(modality, modality.load(make_image_folder(tmp_path / "shapes", per_class=20)), registry,
                     tmp_path, "efficientnet_lite0")
    assert len(runner.splits.train) > CALIBRATION_EXAMPLES
    card = registry.get("efficientnet_lite0")

    def pixels(size: int) -> np.ndarray:
        prep = modality.preprocessing(card, registry, params={"data__image_size": size})
        return np.concatenate([f["pixel_values"] for f in runner.calibration_feeds(prep, seed=0)])

    small, middle, large = pixels(96), pixels(160), pixels(224)
    assert len(small) == CALIBRATION_EXAMPLES and small.size < CALIBRATION_VALUES
    assert len(middle) == 15 and middle.size <= CALIBRATION_VALUES
    assert len(large) == 8 and large.size == CALIBRATION_VALUES
    # the same examples, in the same order: the first ones of the small set, at another size
    means = lambda x: x.reshape(len(x), -1).mean(1)  # noqa: E731
    np.testing.assert_allclose(means(large), means(small[:8]), atol=0.05)
    np.testing.assert_allclose(means(middle), means(small[:15]), atol=0.05)
