"""The Lepton facade: fit, evaluate, compress, save, load, same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lepton_automl import Lepton
from lepton_automl.exceptions import ConfigError
from lepton_automl.export.artifact import Predictor


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(images))[:400]
    return images[idx[:300]], d.target[idx[:300]], images[idx[300:]], d.target[idx[300:]]


def test_fit_evaluate_compress_save_load_round_trip(digits, tmp_path, caplog) -> None:
    x_train, y_train, x_test, y_test = digits
    model = Lepton(build_fn="efficientnet_lite0", input_shape=(32, 32, 3), num_classes=10, verbose=False)
    model.fit(x_train, y_train, epochs=3, batch_size=32)
    loss, acc = model.evaluate(x_test, y_test)
    assert np.isfinite(loss) and acc > 0.5, (loss, acc)

    report = model.compress(prune=0.3, quant="int8")
    assert report.after.params_m < 0.8 * report.before.params_m
    assert report.after.size_mb < report.before.size_mb
    assert report.before.latency_ms > 0 and report.after.latency_ms > 0
    assert report.after.accuracy is not None and "before" in str(report)
    predictions = model.predict(x_test)

    path = model.save(tmp_path / "lepton_model")
    for name in ("model.safetensors", "model.onnx", "model.int8.onnx", "README.md", "lepton.json"):
        assert (path / name).is_file()
    _int8_export_checks(path, tmp_path, caplog)
    again = Lepton.load(path)
    assert (again.predict(x_test) == predictions).all()
    # The pruned torch weights reload into a freshly built (then resized) architecture.
    inputs = model._inputs(x_test[:8])
    with torch.no_grad():
        assert torch.allclose(again.model(inputs), model.model(inputs), atol=1e-4)
    # A facade export is a regular export: the CLI's Predictor runs it on image files.
    from PIL import Image

    Image.fromarray(x_test[0]).save(tmp_path / "digit.png")
    assert Predictor.load(path).predict([str(tmp_path / "digit.png")]) == [str(predictions[0])]


def _int8_export_checks(path, tmp_path, caplog) -> None:
    """The export's card says how its int8 file was quantized, read from the file: static, with 7-bit
    weights on a CPU whose int8 kernels saturate (no VNNI), else 8-bit. The same file re-quantized
    with 8-bit weights warns on loading exactly where this CPU saturates, naming the fix."""
    import json
    import shutil

    from lepton_automl.compression.quantization import quantize_onnx
    from lepton_automl.export.int8 import Int8Weights, int8_weights, saturating_int8

    bits = 7 if saturating_int8() else 8
    meta = json.loads((path / "lepton.json").read_text())
    assert meta["int8_weights"] == {"static": True, "bits": bits}
    assert f"int8 (static, {bits}-bit weights" in (path / "README.md").read_text()
    assert int8_weights(path / "model.onnx") is None
    copy = tmp_path / "eight_bit"
    shutil.copytree(path, copy)
    calibration = [{"pixel_values": np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)}]
    quantize_onnx(copy / "model.onnx", copy / "model.int8.onnx", mode="int8-static", calibration=calibration,
                  reduce_range=False)
    found = int8_weights(copy / "model.int8.onnx")
    assert found == Int8Weights(static=True, bits=8)
    meta["int8_weights"] = {"static": found.static, "bits": found.bits}
    (copy / "lepton.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lepton_automl"):
        Predictor.load(copy)
    assert ("lepton compress" in caplog.text and "no VNNI" in caplog.text) == saturating_int8()


def small_cnn(*, input_shape, num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def test_callable_build_fn_round_trip(digits, tmp_path) -> None:
    x_train, y_train, x_test, _ = digits
    model = Lepton(build_fn=small_cnn, input_shape=(16, 16, 3), verbose=False)
    model.fit(x_train, y_train, epochs=1)
    assert model.num_classes == 10
    path = model.save(tmp_path / "cnn")
    with pytest.raises(ConfigError, match="build_fn=fn"):
        Lepton.load(path)
    again = Lepton.load(path, build_fn=small_cnn)
    assert (again.predict(x_test) == model.predict(x_test)).all()


def test_clear_errors() -> None:
    model = Lepton(build_fn="efficientnet_lite0", input_shape=(32, 32, 3), verbose=False)
    with pytest.raises(ConfigError, match="fit"):
        model.predict(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match="labels"):
        model.fit(np.zeros((4, 8, 8), np.uint8), np.zeros(3))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = small_cnn(input_shape=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet_like(*, weights=None, **kwargs):  # torchvision's builders take **kwargs
    return SmallCNN(kwargs["num_classes"])


@pytest.mark.parametrize("build_fn", [SmallCNN, resnet_like, SmallCNN(num_classes=10)],
                         ids=["num_classes-only", "kwargs", "module-instance"])
def test_build_fn_gets_what_it_accepts(digits, build_fn) -> None:
    x_train, y_train, x_test, y_test = digits
    model = Lepton(build_fn=build_fn, input_shape=(16, 16, 3), verbose=False).fit(x_train[:64], y_train[:64], epochs=1)
    assert model.predict(x_test[:8]).shape == (8,)


def test_build_fn_that_needs_more_is_refused_with_the_fix() -> None:
    def needs_depth(depth, num_classes):
        return SmallCNN(num_classes)

    model = Lepton(build_fn=needs_depth, input_shape=(16, 16, 3), verbose=False)
    with pytest.raises(ConfigError, match="requires 'depth'.*Wrap it"):
        model.fit(np.zeros((4, 16, 16), np.uint8), np.array([0, 1, 0, 1]))


def test_fit_after_compress_forgets_the_compression(digits, tmp_path) -> None:
    import json

    x_train, y_train, _, _ = digits
    model = Lepton(build_fn=small_cnn, input_shape=(16, 16, 3), verbose=False).fit(x_train, y_train, epochs=1)
    model.compress(quant="int8", recovery_epochs=0)
    model.fit(x_train, y_train, epochs=1)
    meta = json.loads((model.save(tmp_path / "m") / "lepton.json").read_text())
    assert meta["params"]["quant__mode"] == "none" and meta["runtime_file"] == "model.onnx"
