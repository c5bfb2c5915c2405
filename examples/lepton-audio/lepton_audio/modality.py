"""``AudioModality``: WAV folders -> log-mel spectrogram images -> the registry's image backbones."""

from __future__ import annotations

import wave
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.data.dataset import LabelledData
from lepton_automl.exceptions import DataError
from lepton_automl.interfaces import Modality, ModelParts
from lepton_automl.log import get_logger

logger = get_logger(__name__)

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms windows
HOP = 160  # 10 ms hop
N_MELS = 64
TOP_DB = 80.0
IMAGE_SIZES = (64, 96, 128)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of a PCM WAV file (8/16/32-bit)."""
    with wave.open(str(path), "rb") as wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        raw = wav.readframes(wav.getnframes())
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise DataError(f"{path}: {8 * width}-bit WAV is not supported; convert it to 16-bit PCM.")
    return samples.reshape(-1, channels).mean(axis=1), rate


def mel_filterbank(*, sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular filters on the HTK mel scale, mel = 2595 log10(1 + f / 700)."""
    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(sr / 2)), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    bank = np.zeros((n_mels, len(freqs)), np.float32)
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        bank[i] = np.maximum(0.0, np.minimum(up, down))
    return bank


_BANK = mel_filterbank()


def log_mel(samples: np.ndarray, rate: int, *, duration_s: float) -> np.ndarray:
    """A (N_MELS, frames) log-mel spectrogram scaled to [0, 1] (0 = TOP_DB below the clip's peak)."""
    if rate != SAMPLE_RATE:  # linear resampling is enough for spectrogram features
        n = int(round(len(samples) * SAMPLE_RATE / rate))
        samples = np.interp(np.linspace(0, len(samples) - 1, n), np.arange(len(samples)), samples)
    length = int(SAMPLE_RATE * duration_s)
    samples = np.pad(samples[:length], (0, max(0, length - len(samples))))
    frames = 1 + (len(samples) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    spectrum = np.abs(np.fft.rfft(samples[idx] * np.hanning(N_FFT), axis=1)) ** 2
    mel = _BANK @ spectrum.T
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    db = np.maximum(db, db.max() - TOP_DB)
    return ((db - db.max() + TOP_DB) / TOP_DB).astype(np.float32)


class AudioModality(Modality):
    name = "audio"
    tasks = ("classification",)
    description = "WAV folders as log-mel spectrograms, classified with image backbones"
    backbone_modality = "image"

    def __init__(self) -> None:
        from lepton_automl.plugins import MODALITIES, PluginRegistry

        # The image modality's backbone handling is reused as is: spectrograms are images.
        self._image = PluginRegistry(MODALITIES).load("image")()

    def can_load(self, source: Any) -> bool:
        if not isinstance(source, (str, Path)) or not Path(source).is_dir():
            return False
        return any(True for _ in Path(source).glob("*/*.wav"))

    def load(self, source: Any, *, options: Mapping[str, Any] | None = None) -> LabelledData:
        root = Path(source)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        examples, labels, bad = [], [], []
        for label, cls in enumerate(classes):
            for path in sorted((root / cls).rglob("*.wav")):
                try:
                    read_wav(path)
                except (wave.Error, EOFError, DataError):
                    bad.append(str(path))
                    continue
                examples.append(str(path))
                labels.append(label)
        report = (f"skipped {len(bad)} unreadable WAV files (first: {bad[0]})",) if bad else ()
        if len(set(labels)) < 2:
            raise DataError(f"{str(root)!r} needs WAV files in at least two class subfolders (ROOT/<class>/*.wav).")
        return LabelledData(examples=tuple(examples), labels=np.array(labels), classes=tuple(classes),
                            name=root.name, report=report)

    def suggest(self, trial: Any, card: BackboneCard) -> dict[str, Any]:
        return {"data__image_size": trial.suggest_categorical("data__image_size", list(IMAGE_SIZES))}

    def default_params(self, card: BackboneCard) -> dict[str, Any]:
        return {"data__image_size": 96}

    def warm_start_variants(self, card: BackboneCard) -> list[dict[str, Any]]:
        return [{"data__image_size": 128}, {"data__image_size": 64}]

    def max_finetune_blocks(self, card: BackboneCard) -> int:
        return self._image.max_finetune_blocks(card)

    def build(self, card: BackboneCard, registry: BackboneRegistry, *, params: Mapping[str, Any],
              finetune_blocks: int = 0, pretrained: bool = True) -> ModelParts:
        if card.modality != "image":
            raise DataError(f"The audio modality uses image backbones; {card.name!r} is a {card.modality} backbone.")
        return self._image.build(card, registry, params=params, finetune_blocks=finetune_blocks,
                                 pretrained=pretrained)

    def preprocessing(self, card: BackboneCard, registry: BackboneRegistry, *,
                      params: Mapping[str, Any]) -> dict[str, Any]:
        image = self._image.preprocessing(card, registry, params=params)
        return {**image, "sample_rate": SAMPLE_RATE, "duration_s": 1.0, "n_mels": N_MELS}

    def encode(self, examples: Sequence[Any], *, preprocessing: Mapping[str, Any]) -> dict[str, np.ndarray]:
        images = []
        for path in examples:
            spec = log_mel(*read_wav(path), duration_s=float(preprocessing["duration_s"]))
            images.append((np.flipud(spec) * 255).astype(np.uint8))  # low frequencies at the bottom
        return self._image.encode(images, preprocessing=preprocessing)

    def input_names(self) -> tuple[str, ...]:
        return self._image.input_names()
