"""The device layer: --device parsing and its errors, the out-of-memory back-off, and the GPU data path
(decoding in worker processes, decoded data kept in memory), which runs on the CPU here exactly as it
runs in front of a GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from lepton_automl.accel import CPU, decode_all, encoded_batches, resolve_device, with_oom_backoff
from lepton_automl.data.split import split_data
from lepton_automl.exceptions import ConfigError
from lepton_automl.interfaces import ExportModel, TupleOut
from lepton_automl.training.finetune import FineTuneConfig, evaluate_accuracy, fine_tune
from lepton_image import ImageModality

PREP = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
# The GPU path's data handling, on the CPU: two decoding processes and an in-memory decoded set.
WORKERS = dataclasses.replace(CPU, workers=2, cache_bytes=2**30)
COMPACT = dataclasses.replace(WORKERS, compact_transfer=True)  # uint8 pixels from the workers, as on a GPU


def test_device_strings_resolve_or_say_what_to_type() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    assert resolve_device("auto").cuda == torch.cuda.is_available()
    with pytest.raises(ConfigError, match=r"Unknown device 'tpu'.*cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="Unknown device"):
        resolve_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_gpu_without_one_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"--device cuda asks for a CUDA GPU, and .*Use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device cuda:1"):
        resolve_device("cuda:1")


def test_out_of_memory_halves_the_batch_until_it_fits_and_says_which() -> None:
    tried = []

    def run(batch: int) -> str:
        tried.append(batch)
        if batch > 40:
            raise torch.OutOfMemoryError(f"CUDA out of memory at batch {batch}")
        return f"ran {batch}"

    assert with_oom_backoff(run, 256) == ("ran 32", 32)
    assert tried == [256, 128, 64, 32]
    with pytest.raises(torch.OutOfMemoryError):  # still too big at the floor: the error as it came
        with_oom_backoff(run, 256, minimum=64)
    with pytest.raises(ValueError, match="not memory"):  # other errors are not retried
        with_oom_backoff(lambda b: (_ for _ in ()).throw(ValueError("not memory")), 8)


def test_worker_processes_decode_the_same_batches_in_the_same_order(image_folder) -> None:
    modality = ImageModality()
    data = modality.load(image_folder)
    order = np.random.default_rng(0).permutation(len(data))
    here = list(encoded_batches(modality, data.examples, PREP, batch_size=5, order=order))
    there = list(encoded_batches(modality, data.examples, PREP, batch_size=5, order=order, accel=WORKERS))
    assert len(here) == len(there) == -(-len(data) // 5)
    assert np.array_equal(np.concatenate([i for i, _ in there]), order)
    for (i1, t1), (i2, t2) in zip(here, there):
        assert np.array_equal(i1, i2)
        assert all(torch.equal(a, b) for a, b in zip(t1, t2))
    decoded = decode_all(modality, data.examples, PREP, accel=WORKERS)
    assert decoded is not None and decoded.tensors[0].shape == (len(data), 3, 32, 32)
    idx = order[:7]
    assert torch.equal(decoded.batch(idx)[0], torch.from_numpy(modality.encode([data.examples[i] for i in idx],
                                                                                 preprocessing=PREP)["pixel_values"]))
    compact = list(encoded_batches(modality, data.examples, PREP, batch_size=5, order=order, accel=COMPACT))
    assert all(t[0].dtype == torch.uint8 for _, t in compact)
    for (_, t1), (_, t2) in zip(here, compact):  # a quarter of the bytes, the same inputs once expanded
        assert torch.allclose(COMPACT.model_inputs(modality, t2, PREP)[0], t1[0], atol=1e-5)
    too_small = dataclasses.replace(WORKERS, cache_bytes=1000)
    assert decode_all(modality, data.examples, PREP, accel=too_small) is None  # decoded per batch instead


def test_a_decoded_text_batch_is_trimmed_to_its_own_longest_text(text_csv, tiny_bert_dir) -> None:
    from lepton_text import TextModality

    modality = TextModality()
    data = modality.load(text_csv)
    long_text = " ".join(["alpha"] * 40)
    examples = tuple(data.examples[:10]) + (long_text,)
    prep = {"max_length": 64, "tokenizer": str(tiny_bert_dir)}
    decoded = decode_all(modality, examples, prep, accel=WORKERS, batch_size=4)
    assert decoded is not None
    width = decoded.tensors[0].shape[1]
    ids, mask = decoded.batch(np.arange(3))  # three short texts: padded columns dropped
    direct = modality.encode(list(examples[:3]), preprocessing=prep)
    assert ids.shape[1] == direct["input_ids"].shape[1] < width
    assert np.array_equal(ids.numpy(), direct["input_ids"]) and np.array_equal(mask.numpy(), direct["attention_mask"])
    assert decoded.batch(np.array([10, 0]))[0].shape[1] == width  # the long text keeps its length


def _model() -> ExportModel:
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten())
    return ExportModel(TupleOut(trunk), nn.Identity(), nn.Linear(8, 3))


@pytest.mark.parametrize("accel", [WORKERS, COMPACT], ids=["float32", "compact"])
def test_fine_tuning_on_decoded_data_in_workers_trains_the_same_weights(image_folder, accel) -> None:
    modality = ImageModality()
    splits = split_data(modality.load(image_folder), seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        first = _model()
    second = _model()
    second.load_state_dict(first.state_dict())
    cfg = FineTuneConfig(epochs=3, lr=3e-3, batch_size=8, seed=1, freeze_batchnorm=False)
    log1 = fine_tune(first, modality, splits.train, PREP, cfg, validation=splits.validation)
    log2 = fine_tune(second, modality, splits.train, PREP, cfg, validation=splits.validation, accel=accel)
    assert log1.curve == log2.curve and log2.micro_batch == 8
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert evaluate_accuracy(second, modality, splits.validation, PREP, accel=accel) == log2.curve[log2.best_epoch - 1]


def test_a_user_who_asks_for_a_missing_gpu_gets_one_line_from_the_cli(image_folder, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from typer.testing import CliRunner

    from lepton_automl.cli import app

    result = CliRunner().invoke(app, ["search", "--data", str(image_folder), "--device", "cuda", "--n-trials", "1",
                                      "--run-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "asks for a CUDA GPU" in result.output and "--device cpu" in result.output
    assert "Traceback" not in result.output

