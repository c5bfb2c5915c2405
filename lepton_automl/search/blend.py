"""Blends: the averaged class probabilities of several finished trials, as one more point on the front.

AutoML systems win by ensembling (AutoGluon's weighted ensemble is Caruana et al.'s "Ensemble Selection
from Libraries of Models", ICML 2004). Every trial stores its artifact's logits on the validation split
(a probe's out of fold: each example scored by the fold head that did not see it) and on the test split.
When the search's trials are done, a ``Blender`` chooses members greedily, with replacement, by the
validation log-loss of their temperature-scaled probabilities averaged (``choose_blend``), and adds the
blend to the study as a trial of its own if, judged cross-fitted, it beats the most accurate trial by at
least half its noise: its latency is its members' summed (they run one after another), its cost is
priced from that, and its files are its members' exports side by side (``export/blend.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.export.artifact import softmax
from lepton_automl.interfaces import TrialResult
from lepton_automl.log import get_logger
from lepton_automl.search.crossfit import HALVINGS, random_halvings
from lepton_automl.search.workers import BLEND_ATTR, WORKER_ATTR

logger = get_logger(__name__)

PREDICTIONS_ATTR = "predictions"
PREDICTIONS_DIR = "predictions"


def save_predictions(run_dir: Path, number: int, logits: Mapping[str, Any]) -> Path:
    """Write one trial's logits by split to ``run_dir/predictions/trial-NNNN.npz``; they outlive the
    trial's model files (a few kB each)."""
    folder = Path(run_dir) / PREDICTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trial-{number:04d}.npz"
    tmp = folder / f".trial-{number:04d}.tmp.npz"
    np.savez(tmp, **{split: np.asarray(v, dtype=np.float32) for split, v in logits.items()})
    tmp.replace(path)
    return path


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


MAX_MEMBERS = 3  # distinct trials in a blend: each adds its latency
ROUNDS = 12  # greedy additions (with replacement): weights in twelfths at most
CANDIDATES = 12  # the most accurate trials that may join
TEMPERATURES = np.geomspace(0.05, 20.0, 49)
SIGNIFICANCE_Z = 0.5  # a blend's cross-fitted gain over the best trial: at least half its standard error


@dataclass(frozen=True)
class BlendMember:
    trial: int
    weight: float
    temperature: float  # the member's logits are divided by it before the softmax


@dataclass(frozen=True)
class BlendChoice:
    members: tuple[BlendMember, ...]
    validation_accuracy: float  # cross-fitted: chosen on one half of the split, scored on the other (averaged)
    validation_log_loss: float  # of the blend chosen on the whole split, there
    best_single_accuracy: float  # the most accurate candidate's, on the same validation examples
    # The most accurate candidate's objective plus the blend's cross-fitted gain over it on the same
    # examples: the scale of the trials it joins (a probe's objective is cross-validated over
    # train+validation, which reads differently from the validation split alone).
    objective: float


def blend_probabilities(logits: Sequence[np.ndarray], members: Sequence[BlendMember]) -> np.ndarray:
    """The weighted mean of the members' temperature-scaled class probabilities."""
    return sum(m.weight * softmax(np.asarray(l, dtype=np.float64) / m.temperature) for l, m in zip(logits, members))


def _log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the validation log-loss (Guo et al., "On Calibration of Modern
    Neural Networks", ICML 2017): a probe's probabilities and a label-smoothed fine-tune's are on
    different scales, and an average of them should weigh each by how sure it has reason to be."""
    z = np.asarray(logits, dtype=np.float64)
    return float(min(TEMPERATURES, key=lambda t: _log_loss(softmax(z / t), labels)))


def _select(validation: Mapping[int, np.ndarray], labels: np.ndarray, first: int, *, max_members: int, rounds: int,
            allowed: Callable[[frozenset[int]], bool]) -> tuple[BlendMember, ...] | None:
    """The greedy selection of ``choose_blend`` on these examples, from ``first``; None for one member."""
    temps = {n: fit_temperature(z, labels) for n, z in validation.items()}
    probs = {n: softmax(np.asarray(z, dtype=np.float64) / temps[n]) for n, z in validation.items()}
    counts = {first: 1}
    total = probs[first].copy()
    loss = _log_loss(total, labels)
    for k in range(1, rounds):
        best: tuple[float, int] | None = None
        for n, p in probs.items():
            members = frozenset(counts) | {n}
            if len(members) > max_members or not allowed(members):
                continue
            trial_loss = _log_loss((total + p) / (k + 1), labels)
            if best is None or trial_loss < best[0]:
                best = (trial_loss, n)
        if best is None or best[0] >= loss - 1e-6:
            break
        loss = best[0]
        counts[best[1]] = counts.get(best[1], 0) + 1
        total += probs[best[1]]
    if len(counts) < 2:
        return None
    n_total = sum(counts.values())
    return tuple(BlendMember(trial=n, weight=c / n_total, temperature=temps[n])
                 for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def choose_blend(validation: Mapping[int, np.ndarray], labels: np.ndarray, *, accuracy: Mapping[int, float],
                 max_members: int = MAX_MEMBERS, rounds: int = ROUNDS, z: float = SIGNIFICANCE_Z,
                 halvings: int = HALVINGS, seed: int = 0,
                 allowed: Callable[[frozenset[int]], bool] = lambda members: True) -> BlendChoice | None:
    """Ensemble selection (Caruana et al., 2004) on the validation logits of candidate trials.

    Start from the most accurate candidate (``accuracy``: the search's objective); each round adds the
    candidate, a member already or not, whose joining lowers the blend's validation log-loss most, while
    the blend has at most ``max_members`` distinct trials and ``allowed`` accepts their set (the user's
    limits). The log-loss, not the accuracy, decides: on a few hundred validation examples accuracy
    moves in steps of one example, and a greedy search on it fits their noise.

    A blend chosen on the validation split reads too well there, so it is judged cross-fitted: the
    selection is run on one half of the split (stratified) and scored on the other, both ways, averaged
    over ``halvings`` random halvings (``seed``). It is returned only if, on those scores, it beats the
    most accurate candidate on the same examples by a one-sided McNemar statistic of at least ``z``
    (examples only it gets right minus examples only the candidate gets right, at least ``z`` times the
    square root of their sum, and at least one); else None. Its ``validation_accuracy`` is the
    cross-fitted one; its ``objective`` puts it on the scale of the trials it joins (see
    ``BlendChoice``). Measured: a blend accepted on its in-sample gain (one digit of 360) scored 2.2
    points below the most accurate trial on test; cross-fitted, the same blend loses to that trial
    (statistic -0.8). Over five stored studies (glyphs, digits, man pages on two splits) only the glyph
    blend passed (statistic 0.9), and it scored 0.719 on test against the most accurate trial's 0.706."""
    labels = np.asarray(labels)
    if len(validation) < 2 or not len(labels):
        return None
    temps = {n: fit_temperature(v, labels) for n, v in validation.items()}
    first = max(validation, key=lambda n: (accuracy[n], -_log_loss(softmax(np.asarray(validation[n]) / temps[n]), labels)))
    members = _select(validation, labels, first, max_members=max_members, rounds=rounds, allowed=allowed)
    if members is None:
        return None
    single = np.asarray(validation[first]).argmax(1) == labels
    only_blend = only_single = crossfit = 0.0
    for half in random_halvings(labels, halvings=halvings, seed=seed):
        right = np.zeros(len(labels), dtype=bool)
        for h in (0, 1):
            fit, held = half != h, half == h
            chosen = _select({n: np.asarray(v)[fit] for n, v in validation.items()}, labels[fit], first,
                             max_members=max_members, rounds=rounds, allowed=allowed) if fit.any() else None
            if chosen is None:
                right[held] = single[held]
            else:
                probs = blend_probabilities([np.asarray(validation[m.trial])[held] for m in chosen], chosen)
                right[held] = probs.argmax(1) == labels[held]
        only_blend += (right & ~single).sum() / halvings
        only_single += (~right & single).sum() / halvings
        crossfit += right.mean() / halvings
    if only_blend - only_single < max(1.0, z * np.sqrt(only_blend + only_single)):
        return None
    blended = blend_probabilities([validation[m.trial] for m in members], members)
    return BlendChoice(members=members, validation_accuracy=float(crossfit),
                       validation_log_loss=_log_loss(blended, labels), best_single_accuracy=float(single.mean()),
                       objective=float(accuracy[first]) + float(crossfit) - float(single.mean()))


# What a blend sums over its members, from their trials' measurements (they run one after another).
SUMMED = ("latency_ms", "latency_p90_ms", "size_mb", "size_gz_mb", "params_m", "gmacs", "train_seconds")


def is_blend_trial(trial: Any) -> bool:
    return bool(trial.user_attrs.get(BLEND_ATTR))


def _summed(trials: Sequence[Any]) -> dict[str, float]:
    sums = {key: float(sum(float(t.user_attrs.get(key) or 0.0) for t in trials)) for key in SUMMED}
    sums["latency_ms"] = float(sum(t.values[1] for t in trials))  # an objective, not a user attribute
    sums["throughput_per_s"] = 1.0 / sum(1.0 / float(t.user_attrs["throughput_per_s"]) for t in trials)
    return sums


@dataclass(frozen=True)
class Blender:
    """Blends the finished trials of one study: ``choose`` one, ``add`` it to the study as a trial.

    ``labels``: the validation and test labels, by split; ``cost``, ``limits``: the search's; ``name``,
    ``data``: what the blend's model card says; ``worker``: the process adding it (``WORKER_ATTR``);
    ``floor``: the usefulness floor (``search.limits.usefulness_floor``), its ``above_chance`` constraint."""

    study: Any
    run_dir: Path
    labels: Mapping[str, np.ndarray]
    cost: Any
    limits: Any
    modality: Any
    registry: Any
    name: str
    data: Mapping[str, Any] | None = None
    worker: str | None = None
    floor: float | None = None
    candidates: int = CANDIDATES

    def trials(self) -> dict[int, Any]:
        """The most accurate finished, feasible trials (not blends) whose logits and files are kept."""
        import optuna

        from lepton_automl.search.probe_export import can_materialize

        out = {}
        done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in sorted(done, key=lambda t: -t.values[0]):
            path, artifact = t.user_attrs.get(PREDICTIONS_ATTR), t.user_attrs.get("artifact")
            if (is_blend_trial(t) or not path or not Path(path).is_file() or not artifact
                    or not can_materialize(artifact) or any(v > 0 for v in t.constraints.values())):
                continue
            out[t.number] = t
            if len(out) == self.candidates:
                break
        return out

    def logits(self, numbers: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
        """Stored logits by trial, of those whose rows match this study's splits."""
        trials = self.study.get_trials(deepcopy=False)
        by_number = {t.number: t for t in trials}
        out = {}
        for n in numbers:
            z = load_predictions(by_number[n].user_attrs[PREDICTIONS_ATTR])
            if all(split in z and len(z[split]) == len(self.labels[split]) for split in ("validation", "test")):
                out[n] = z
        return out

    def measured(self, members: Sequence[Any], accuracy: float) -> tuple[dict[str, float], TrialResult]:
        """The summed measurements of ``members`` (trials), and the result the limits judge."""
        sums = _summed(members)
        cost_usd = float(self.cost.total_usd(train_seconds=sums["train_seconds"],
                                             latency_ms=1000.0 / sums["throughput_per_s"]))
        return sums, TrialResult(accuracy=accuracy, latency_ms=sums["latency_ms"], cost_usd=cost_usd,
                                 size_gz_mb=sums["size_gz_mb"], params_m=sums["params_m"])

    def choose(self) -> BlendChoice | None:
        trials = self.trials()
        logits = self.logits(list(trials))

        def allowed(members: frozenset[int]) -> bool:  # the user's limits, but for accuracy
            _, result = self.measured([trials[n] for n in members], 1.0)
            return all(v <= 0 for v in self.limits.constraints(result).values())

        choice = choose_blend({n: z["validation"] for n, z in logits.items()}, self.labels["validation"],
                              accuracy={n: trials[n].values[0] for n in logits}, allowed=allowed)
        if choice is None:
            logger.info("blend: no blend of the %d most accurate trials beats the most accurate one on "
                        "validation, cross-fitted, by half its noise (one-sided McNemar statistic %.1f)",
                        len(logits), SIGNIFICANCE_Z)
        return choice

    def add(self, choice: BlendChoice) -> Any | None:
        """Write the blend's folder and add it to the study as a finished trial (returned); None when
        the study already holds it."""
        import optuna

        from lepton_automl.export.blend import write_blend
        from lepton_automl.search.probe_export import materialize

        numbers = [m.trial for m in choice.members]
        if any(t.user_attrs.get(BLEND_ATTR) == numbers for t in self.study.get_trials(deepcopy=False)):
            logger.info("blend: the study already holds the blend of trials %s", numbers)
            return None
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        members = [by_number[n] for n in numbers]
        logits = self.logits(numbers)
        sums, result = self.measured(members, choice.objective)
        test = blend_probabilities([logits[n]["test"] for n in numbers], choice.members)
        test_accuracy = float((test.argmax(1) == self.labels["test"]).mean())
        metrics = {"accuracy": choice.objective, "holdout_accuracy": choice.validation_accuracy,
                   "test_accuracy": test_accuracy,
                   "cost_usd": result.cost_usd, "best_single_accuracy": choice.best_single_accuracy,
                   "validation_log_loss": choice.validation_log_loss, **sums}
        folder = Path(self.run_dir) / ("blend-" + "-".join(f"{n:04d}" for n in sorted(numbers)))
        exports = [materialize(t.user_attrs["artifact"], modality=self.modality, registry=self.registry)
                   for t in members]
        write_blend(folder, members=[(Path(e), m.trial, m.weight, m.temperature)
                                     for e, m in zip(exports, choice.members)],
                    name=f"{self.name} (blend of {len(members)})", metrics=metrics, data=self.data,
                    search={"study": self.study.study_name, "blend": numbers})
        constraints = self.limits.constraints(result)
        if self.floor is not None:  # as every trial's (TrialRunner.__call__)
            constraints["above_chance"] = self.floor - choice.objective
        config = {"blend": numbers, "weights": [round(m.weight, 4) for m in choice.members],
                  "members": [dict(t.user_attrs.get("config") or t.params) for t in members]}
        user_attrs = {"config": config, BLEND_ATTR: numbers, "blend_members": [dataclasses.asdict(m) for m in choice.members],
                      "test_accuracy": test_accuracy, "holdout_accuracy": choice.validation_accuracy,
                      "artifact": str(folder), "best_single_accuracy": choice.best_single_accuracy, **sums}
        if self.worker is not None:
            user_attrs[WORKER_ATTR] = self.worker
        self.study.add_trial(optuna.trial.create_trial(
            values=[choice.objective, sums["latency_ms"], result.cost_usd], user_attrs=user_attrs,
            system_attrs={f"constraints:{k}": float(v) for k, v in constraints.items()}))
        logger.info("blend of %s: objective accuracy %.4f (validation, cross-fitted, %.4f where the most "
                    "accurate trial has %.4f), test %.4f, %.3f ms",
                    " + ".join(f"trial {m.trial} x{m.weight:.2f}" for m in choice.members), choice.objective,
                    choice.validation_accuracy, choice.best_single_accuracy, test_accuracy, sums["latency_ms"])
        # Another worker may have added a trial since: find this one by its members.
        return next(t for t in reversed(self.study.get_trials(deepcopy=False))
                    if t.user_attrs.get(BLEND_ATTR) == numbers)

    def run(self) -> Any | None:
        """Choose a blend and add it: the added trial, or None."""
        choice = self.choose()
        return None if choice is None else self.add(choice)
