"""Hardware price profiles and the cost objective.

cost_usd = training cost + predictions_per_month x inference cost per prediction, where
- training cost = measured trial seconds (frozen-feature extraction included, even when it came
  from the cache, so a trial's cost does not depend on the trials before it) x $/h / 3600;
- inference cost per prediction = the measured time of one batch at the serving batch size (32 by
  default) divided by that batch size, x $/h / 3600 on the serving profile: one instance serving
  batched requests back to back. The latency objective stays batch 1, what one request waits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

from lepton_automl.exceptions import ConfigError, did_you_mean
from lepton_automl.names import check_name

BUILTIN_PROFILES = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: str
    usd_per_hour: float
    description: str = ""
    source: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        check_name(self.name, what="Hardware profile")


def load_profiles(extra_file: str | Path | None = None) -> dict[str, HardwareProfile]:
    tables: dict[str, Any] = tomllib.loads(BUILTIN_PROFILES.read_text())
    if extra_file is not None:
        path = Path(extra_file)
        if not path.is_file():
            raise ConfigError(f"Hardware file {str(path)!r} does not exist.")
        tables.update(tomllib.loads(path.read_text()))
    fields = set(HardwareProfile.__dataclass_fields__) - {"name"}
    out = {}
    for name, data in tables.items():
        unknown = set(data) - fields
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"Unknown key {key!r} in hardware profile {name!r}.{did_you_mean(key, fields)}")
        out[name] = HardwareProfile(name=name, **data)
    return out


def get_profile(name: str, profiles: Mapping[str, HardwareProfile]) -> HardwareProfile:
    if name not in profiles:
        raise ConfigError(
            f"Unknown hardware profile {name!r}.{did_you_mean(name, profiles)} "
            f"Known: {', '.join(sorted(profiles))}."
        )
    return profiles[name]


@dataclass(frozen=True)
class CostModel:
    train: HardwareProfile
    serve: HardwareProfile
    predictions_per_month: float = 1_000_000.0

    def training_usd(self, seconds: float) -> float:
        return seconds * self.train.usd_per_hour / 3600.0

    def inference_usd_per_million(self, latency_ms: float) -> float:
        return 1e6 * (latency_ms / 1000.0) * self.serve.usd_per_hour / 3600.0

    def total_usd(self, *, train_seconds: float, latency_ms: float) -> float:
        per_prediction = self.inference_usd_per_million(latency_ms) / 1e6
        return self.training_usd(train_seconds) + self.predictions_per_month * per_prediction
