"""The CUDA path, on a real GPU: mixed-precision features that match the CPU's, fine-tuning that learns
there and hands the model back, the out-of-memory back-off against the GPU's own allocator, and an
export served on the GPU. CI has no GPU: these skip there, with the reason. Run them on a GPU machine
with ``pytest tests/test_gpu.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lepton_automl.accel import resolve_device, with_oom_backoff
from lepton_automl.data.split import split_data
from lepton_automl.export.trunk import run_trunk
from lepton_automl.interfaces import ExportModel, TupleOut
from lepton_automl.training.finetune import FineTuneConfig, evaluate_accuracy, fine_tune
from lepton_image import ImageModality

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CI has none); run `pytest tests/test_gpu.py` on one")

PREP = {"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("gpu-images"), per_class=60, size=32)


def test_cuda_means_mixed_precision_channels_last_and_decoding_workers() -> None:
    accel = resolve_device("cuda")
    assert accel.cuda and accel.device == f"cuda:{torch.cuda.current_device()}"
    assert accel.amp_dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert accel.channels_last and accel.pin_memory and accel.cache_bytes > 0
    assert resolve_device("auto") == accel


def test_features_on_the_gpu_match_the_cpu(many_images) -> None:
    import timm

    modality = ImageModality()
    data = modality.load(many_images)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        trunk = TupleOut(timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0))
    cpu = run_trunk(trunk, modality, data.examples, preprocessing=PREP)[0]
    gpu = run_trunk(trunk, modality, data.examples, preprocessing=PREP, accel=resolve_device("cuda"))[0]
    assert next(trunk.parameters()).device.type == "cpu"  # handed back
    assert gpu.shape == cpu.shape and gpu.dtype == np.float32
    cosine = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cosine.min() > 0.99, cosine.min()  # bf16 rounding, not different features


def _model() -> ExportModel:
    trunk = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ExportModel(TupleOut(trunk), nn.Identity(), nn.Linear(16, 3))


def test_fine_tuning_on_the_gpu_learns_as_on_the_cpu_and_hands_the_model_back(many_images) -> None:
    modality = ImageModality()
    splits = split_data(modality.load(many_images), seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        on_cpu = _model()
    on_gpu = _model()
    on_gpu.load_state_dict(on_cpu.state_dict())
    cfg = FineTuneConfig(epochs=6, lr=1e-2, batch_size=16, seed=0, freeze_batchnorm=False, label_smoothing=0.0)
    cpu_log = fine_tune(on_cpu, modality, splits.train, PREP, cfg, validation=splits.validation)
    gpu_log = fine_tune(on_gpu, modality, splits.train, PREP, cfg, validation=splits.validation,
                        accel=resolve_device("cuda"))
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in on_gpu.parameters())
    gpu_acc = evaluate_accuracy(on_gpu, modality, splits.validation, PREP)
    cpu_acc = evaluate_accuracy(on_cpu, modality, splits.validation, PREP)
    # 36 validation images of 3 classes (chance 0.33): both learn, to within bf16's noise of each other.
    assert gpu_acc >= 0.6 and abs(gpu_acc - cpu_acc) <= 0.15, (gpu_log.curve, cpu_log.curve)


def test_the_batch_backs_off_until_the_gpu_allocator_can_hold_it() -> None:
    free, total = torch.cuda.mem_get_info()

    def allocate(gib: int) -> int:
        block = torch.empty(gib * 2**30, dtype=torch.uint8, device="cuda")  # a real allocation
        size = block.numel()
        del block
        return size

    start = 2 ** int(np.ceil(np.log2(total / 2**30)) + 2)  # 4-8x the card's memory: cannot fit
    size, fit = with_oom_backoff(allocate, start)
    assert fit < total / 2**30 and fit >= start // 2**4 and size == fit * 2**30
    torch.cuda.empty_cache()


def test_an_export_served_on_the_gpu_predicts_what_onnx_runtime_predicts(many_images, tmp_path) -> None:
    from lepton_automl.backbones import BackboneRegistry
    from lepton_automl.export.artifact import Predictor
    from lepton_automl.search.probe_export import materialize
    from tests.test_pruning_in_search import _runner

    modality = ImageModality()
    runner = _runner(modality, modality.load(many_images), BackboneRegistry(), tmp_path, "efficientnet_lite0")
    runner.evaluate({"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "probe",
                     "prune__method": "none", "quant__mode": "none"}, trial_dir=tmp_path / "model", seed=0)
    path = materialize(tmp_path / "model", modality=modality, registry=runner.registry)
    cpu, gpu = Predictor(path), Predictor(path, device="cuda")
    assert cpu.runtime_used == "onnxruntime" and gpu.runtime_used.startswith("torch-bf16 (cuda")
    examples = [str(p) for p in sorted(many_images.rglob("*.png"))]
    agree = (cpu.logits(examples).argmax(1) == gpu.logits(examples).argmax(1)).mean()
    assert len(examples) == 180 and agree >= 0.95, agree
