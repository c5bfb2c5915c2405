"""The example third-party plugin in examples/lepton-audio: installed, found by entry point, searched."""

from __future__ import annotations

import importlib
import importlib.metadata
import wave
from pathlib import Path

import numpy as np
import pytest

from lepton_automl.plugins import MODALITIES, PluginRegistry
from lepton_automl.testing import ModalityCase, ModalityTestCase

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "examples" / "lepton-audio"


@pytest.fixture(scope="session")
def audio_plugin():
    """The example plugin, installed by `bash install.sh --test`; a test never installs anything itself."""
    if not any(ep.name == "audio" for ep in importlib.metadata.entry_points(group=MODALITIES)):
        pytest.fail(f"the example audio plugin is not installed: run `bash install.sh --test`, or "
                    f"`.venv/bin/python -m pip install --no-deps -e {PLUGIN_DIR}`")
    return importlib.import_module("lepton_audio")


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16_000) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="session")
def wav_folder(tmp_path_factory) -> Path:
    """Three classes of half-second clips: a low tone, a high tone, and white noise."""
    root = tmp_path_factory.mktemp("audio") / "sounds"
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16_000
    for cls in ("low", "high", "noise"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            if cls == "noise":
                clip = rng.normal(0, 0.3, t.shape)
            else:
                f = rng.uniform(150, 300) if cls == "low" else rng.uniform(2500, 4000)
                clip = 0.5 * np.sin(2 * np.pi * f * t) + rng.normal(0, 0.01, t.shape)
            _write_wav(root / cls / f"{i:02d}.wav", clip)
    return root


def test_found_through_its_entry_point(audio_plugin) -> None:
    registry = PluginRegistry(MODALITIES)
    assert registry["audio"].distribution == "lepton-audio"
    assert registry.load("audio") is audio_plugin.AudioModality


class TestAudioModality(ModalityTestCase):
    @pytest.fixture
    def case(self, audio_plugin, wav_folder) -> ModalityCase:
        first = next((wav_folder / "low").glob("*.wav"))
        return ModalityCase(modality=audio_plugin.AudioModality(), source=wav_folder,
                            backbone="efficientnet_lite0", predict_inputs=[str(first)])


def test_search_and_predict_with_the_third_party_modality(audio_plugin, wav_folder, tmp_path) -> None:
    from lepton_automl.export.artifact import Predictor
    from lepton_automl.search.engine import search

    outcome = search(wav_folder, backbones=["efficientnet_lite0"], n_trials=2, run_root=tmp_path)
    assert outcome.study.user_attrs["modality"] == "audio"  # detected from the data, no flag
    assert outcome.front
    best = max(outcome.front, key=lambda r: r.accuracy)
    assert best.accuracy >= 0.8
    clip = next((wav_folder / "high").glob("*.wav"))
    assert Predictor.load(best.artifact).predict([str(clip)]) == ["high"]
