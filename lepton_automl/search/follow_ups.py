"""Probes an ensemble probe made cheap: its members' own, queued to run next.

An ensemble probe whose members had no probe at its input size (or length) extracts every member's
features there and builds every member's trunk entry: export, check, latency (``search/probe_trial.py``
measures an ensemble from its members' entries). A probe on one member alone then costs a
cross-validated fit on cached features and nothing else, and it may be the front's point between the
ensemble and the slower sizes: one backbone, a third of the ensemble's latency. The sampler does not know
that it is cheap, and often never draws it: in a stored 600-s glyph search the ensembles at 160 and
128 px extracted lite0, lite1 and lite2 there (66 and 31 s), and no single-backbone probe at 160 px ran.

So when an ensemble probe completes, each member's probe with the same preprocessing and quantization is
enqueued, unless the study ran or queued that configuration already. Optuna runs waiting trials before
it samples, so they run next (on whichever worker asks first), count as trials like any other, and a
member that ran meanwhile is skipped as a repeat (``search/repeats.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.study import Study
from optuna.trial import TrialState

from lepton_automl.interfaces import ensemble_members
from lepton_automl.log import get_logger

logger = get_logger(__name__)


def member_probes(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each member's probe at ``config``'s preprocessing and quantization, when ``config`` is an
    ensemble probe without pruning; else none."""
    members = ensemble_members(str(config["backbone"]))
    probe = config.get("train__mode", "probe") == "probe" and config.get("prune__method", "none") == "none"
    if len(members) < 2 or not probe:
        return []
    return [{**config, "backbone": name} for name in members]


def enqueue_member_probes(study: Study, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Enqueue the member probes of the completed ensemble probe ``config`` (``member_probes``) that
    ``study`` has neither run nor queued; returns those enqueued."""
    wanted = member_probes(config)
    if not wanted:
        return []
    known = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            known.append(dict(t.system_attrs.get("fixed_params") or {}))
        elif t.user_attrs.get("config"):
            known.append(dict(t.user_attrs["config"]))
    queued = [member for member in wanted if not any(_same(member, other) for other in known)]
    for member in queued:
        study.enqueue_trial(member)
    if queued:
        logger.info("queued the probes of %s alone (%s): their features and trunks are cached now",
                    " and ".join(m["backbone"] for m in queued),
                    ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if k.startswith("data__")))
    return queued


def _same(config: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether ``other`` (a trial's configuration, or a waiting trial's fixed parameters) is ``config``:
    equal on every key ``config`` sets."""
    return all(other.get(key) == value for key, value in config.items())
