"""The search: one Optuna study over the space, stored in SQLite by default, resumable.

``search(...)`` ingests and splits the data through the modality plugin, builds the study
(directions: maximize accuracy, minimize latency_ms, minimize cost_usd), enqueues warm-start trials
on a fresh study, and runs trials until the study holds ``n_trials`` finished trials or ``timeout``
passes. Rerunning with the same storage and study name resumes: finished trials count toward
``n_trials``. A trial that raises is recorded as failed, with its reason, and the study goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from lepton_automl.accel import Accelerator, resolve_device
from lepton_automl.backbones import BackboneRegistry
from lepton_automl.cost.hardware import CostModel, get_profile, load_profiles
from lepton_automl.data.dataset import Splits
from lepton_automl.data.split import split_data
from lepton_automl.exceptions import ConfigError, DataError, did_you_mean
from lepton_automl.interfaces import Modality
from lepton_automl.log import get_logger
from lepton_automl.plugins import MODALITIES, PluginRegistry
from lepton_automl.search.blend import Blender, is_blend_trial
from lepton_automl.search.early_stopping import EarlyStopping
from lepton_automl.search.front import FrontRow, front_rows
from lepton_automl.search.objective import Limits, TrialRunner, usefulness_floor
from lepton_automl.search.probe_export import is_recipe, materialize
from lepton_automl.search.repeats import is_repeat, was_not_run
from lepton_automl.search.retired import RAN_INSTEAD_ATTR, is_retired
from lepton_automl.search.workers import (
    SURPLUS_ATTR,
    WORKER_ATTR,
    StopWhenCounted,
    counted_trials,
    fail_dead_local_trials,
    live_workers,
    make_storage,
    worker_identity,
    worker_seed,
)
from lepton_automl.search.space import SearchSpace, ensemble_of, warm_start_configs
from lepton_automl.training.cache import FeatureCache
from lepton_automl.export.trunk import Progress

logger = get_logger(__name__)

DIRECTIONS = ("maximize", "minimize", "minimize")
METRIC_NAMES = ["accuracy", "latency_ms", "cost_usd"]
SAMPLERS = ("tpe", "nsga2", "random")


@dataclass(frozen=True)
class SearchOutcome:
    study: Any
    front: list[FrontRow]
    splits: Splits
    run_dir: Path
    storage: str
    failed: list[tuple[int, str]] = field(default_factory=list)
    stopped: list[tuple[int, str]] = field(default_factory=list)
    repeats: int = 0  # configurations drawn again, not run (search/repeats.py)
    retired: int = 0  # draws of an option that had not paid in the study, not run (search/retired.py)
    ran_instead: int = 0  # draws of such an option run without it (int8 draws run in fp32)


def resolve_modality(source: Any, name: str | None, modalities: PluginRegistry | None = None) -> Modality:
    registry = modalities or PluginRegistry(MODALITIES)
    if name is not None:
        return registry.load(name)()
    for mod_name, cls in registry.load_all().items():
        instance = cls()
        if instance.can_load(source):
            logger.info("data %r looks like modality %r", source, mod_name)
            return instance
    raise DataError(
        f"No installed modality recognises {source!r}. Pass --modality NAME "
        f"(installed: {', '.join(registry) or 'none'})."
    )


def make_sampler(name: str, *, seed: int) -> optuna.samplers.BaseSampler:
    """Multi-objective TPE by default. Measured (benchmarks/search.py, one seed, equal budgets of
    180 s on digits and 240 s on the Debian text set; hypervolume of the final front):
    digits TPE 2.18, NSGA-II 2.18, random 2.12; text TPE 1.42, NSGA-II 1.40, random 1.38. At these
    budgets (8-16 trials) TPE and NSGA-II are level and both beat random sampling; TPE is the
    default because it models the conditional space (fine-tuning and pruning parameters exist only
    for some trials) without needing a population of 8 before it adapts. GP was not benchmarked.
    """
    # Optuna 5 samplers read the constraints each trial stores with Trial.set_constraint; the old
    # constraints_func argument is deprecated there.
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=6)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"Unknown sampler {name!r}.{did_you_mean(name, SAMPLERS)} Use one of {', '.join(SAMPLERS)}.")


def default_storage(run_root: Path) -> str:
    run_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_root / 'lepton.db').resolve()}"


def search(
    data: Any,
    *,
    modality: str | Modality | None = None,
    data_options: Mapping[str, Any] | None = None,
    registry: BackboneRegistry | None = None,
    backbones: Sequence[str] | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    n_trials: int = 20,
    timeout: float | None = None,
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    seed: int = 0,
    run_root: str | Path = "lepton_runs",
    warm_start: bool = True,
    untrained: bool = False,
    limits: Limits | None = None,
    train_profile: str = "local-cpu",
    serve_profile: str = "local-cpu",
    predictions_per_month: float = 1_000_000.0,
    hardware_file: str | Path | None = None,
    space_options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
    keep_all_artifacts: bool = False,
    trial_timeout: float | None = None,
    class_weights: bool = False,
    warm_start_from: str | None = None,
    early_stopping: EarlyStopping | None = EarlyStopping(),
    serving_batch: int = 32,
    progress: Progress | None = None,
    callbacks: Sequence[Callable[[Any, Any], None]] = (),
    ensembles: bool = True,
    blends: bool = True,
    worker: int | None = None,
    device: str | Accelerator = "cpu",
) -> SearchOutcome:
    """Run (or resume) a multi-objective search and return the study and its Pareto front.

    ``device`` ("auto", "cpu", "cuda", "cuda:N", or an ``Accelerator``) is where trunk features are
    extracted and networks trained; what ships is measured on the serving profile's runtime.
    ``ensembles``: probes on several backbones' features side by side join the space; ``blends``: when
    the trials are done, a blend of the most accurate ones (their averaged probabilities,
    ``search/blend.py``) joins the study if it beats its best member on validation."""
    accel = device if isinstance(device, Accelerator) else resolve_device(device)
    registry = registry or BackboneRegistry()
    mod = modality if isinstance(modality, Modality) else resolve_modality(data, modality)
    labelled = mod.load(data, options=data_options)
    splits = split_data(labelled, validation=validation_fraction, test=test_fraction, seed=seed)
    logger.info("data %s: %d examples, %d classes; split %d/%d/%d", labelled.name, len(labelled),
                labelled.num_classes, len(splits.train), len(splits.validation), len(splits.test))

    names = list(backbones) if backbones else [
        c.name for c in registry.list(modality=mod.backbones_from(), available=None if untrained else True)
    ]
    for name in names:
        card = registry.get(name)
        if card.modality != mod.backbones_from():
            raise ConfigError(
                f"Backbone {name!r} is for {card.modality!r} data, not {mod.name!r}. List the right ones "
                f"with `lepton registry list --modality {mod.backbones_from()}`."
            )
        if not untrained and not registry.available(card):
            raise ConfigError(
                f"Backbone {name!r} has no weights available offline. Pick one listed by "
                f"`lepton registry list --pretrained --modality {mod.backbones_from()}`, or pass --untrained."
            )
    space = SearchSpace.from_options(backbones=names, options=space_options,
                                     ensembles=ensemble_of(names, mod, registry) if ensembles else (),
                                     size_limited=limits is not None and limits.max_size_mb is not None)

    run_root = Path(run_root)
    study_name = study_name or f"{mod.name}-{labelled.name}"
    storage_url = storage if isinstance(storage, str) else None
    storage = storage or default_storage(run_root)
    if isinstance(storage, str):
        storage = make_storage(storage)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=list(DIRECTIONS),
                                load_if_exists=True)
    fail_dead_local_trials(study)
    if worker is None:  # the first worker keeps the user's seed; later ones derive theirs
        worker = len(live_workers(study))
    study.sampler = (sampler if isinstance(sampler, optuna.samplers.BaseSampler)
                     else make_sampler(sampler, seed=worker_seed(seed, worker)))
    fingerprint = splits.fingerprint()
    known = study.user_attrs.get("data_fingerprint")
    if known is not None and known != fingerprint:
        raise ConfigError(
            f"Study {study_name!r} in {storage} was run on different data (or another seed). "
            "Pass a new --study-name, or the same data and seed to resume."
        )
    if known is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(METRIC_NAMES)
        study.set_user_attr("data_fingerprint", fingerprint)
        study.set_user_attr("modality", mod.name)
        study.set_user_attr("classes", list(splits.classes))
        study.set_user_attr("limits", dataclasses.asdict(limits or Limits()))  # drawn by the report
    if warm_start and not study.trials:
        configs = (_configs_from_study(warm_start_from, storage, space) if warm_start_from else
                   warm_start_configs(space, mod, registry,
                                      mod.warm_start_variants(registry.get(names[0]))))
        configs = configs[:n_trials]  # never queue more than the study will run
        for config in configs:
            study.enqueue_trial(config, skip_if_exists=True)
        logger.info("warm start: %d configurations enqueued%s", len(configs),
                    f" from study {warm_start_from!r}" if warm_start_from else " (linear probes, fp32 and int8)")

    profiles = load_profiles(hardware_file)
    cost = CostModel(train=get_profile(train_profile, profiles), serve=get_profile(serve_profile, profiles),
                     predictions_per_month=predictions_per_month)
    if cost.serve.device != "cpu":
        # Trials are timed with ONNX Runtime on this machine's CPU: a GPU's hourly price times a CPU's
        # throughput overstates what serving there costs, and the user should know before reading the front.
        logger.warning("serving profile %r is a %s machine, but the search times every model with ONNX Runtime "
                       "on this machine's CPU: its cost objective prices CPU throughput at %s's hourly price. "
                       "For a consistent price pass a CPU profile (--serve-hardware aws-c7i.large); to time "
                       "a chosen export on the GPU, run `lepton compress MODEL_DIR --device cuda`.",
                       cost.serve.name, cost.serve.device, cost.serve.name)
    cache = FeatureCache(Path(cache_dir) if cache_dir else run_root / "feature-cache")
    run_dir = run_root / study_name
    # Optuna's timeout only stops new trials; a trial still running past it (plus a minute's grace
    # to finish what it measured) is stopped, so that --timeout bounds the search's wall time.
    search_ends_at = None if timeout is None else time.perf_counter() + float(timeout) + 60.0
    if timeout is not None:
        # No single trial may take more than a quarter of the budget: one slow configuration must not
        # eat the search (a pruned lite0 with recovery once ran 237 of 600 s). --trial-timeout can only lower it.
        cap = float(timeout) / 4.0
        trial_timeout = cap if trial_timeout is None else min(float(trial_timeout), cap)
    runner = TrialRunner(modality=mod, registry=registry, splits=splits, space=space, cache=cache, cost=cost,
                         run_dir=run_dir, limits=limits or Limits(), seed=seed, pretrained=not untrained,
                         threads=threads, trial_timeout=trial_timeout, search_ends_at=search_ends_at,
                         class_weights=class_weights, early_stopping=early_stopping, serving_batch=serving_batch,
                         progress=progress, n_trials=n_trials, budget_s=timeout, accelerator=accel)
    if accel.cuda:
        logger.info("training and feature extraction on %s (%s, %s mixed precision, %d decoding workers)",
                    accel.device, accel.name(), accel.amp_dtype, accel.workers)
    done = counted_trials(study)
    remaining = max(0, n_trials - done)
    if remaining == 0:
        logger.info("study %r already has %d finished trials; nothing to run", study_name, done)
    else:
        logger.info("study %r: running up to %d trials (%d already finished; worker %d) in %s", study_name,
                    remaining, done, worker, _redact(storage_url) if storage_url else default_storage(run_root))
        # No n_trials here: Optuna would count every trial, repeated configurations included.
        study.optimize(runner, n_trials=None, timeout=timeout, catch=(Exception,),
                       callbacks=[*callbacks, StopWhenCounted(n_trials), collect_after_work])
    if blends and remaining:  # a resumed study with nothing left to run keeps what it holds
        _blend(study, runner, cost=cost, limits=limits or Limits())
    front = front_rows(study)
    _write_front_exports(front, modality=mod, registry=registry)
    if not keep_all_artifacts:
        _remove_dominated_artifacts(study, keep={r.number for r in front}, run_dir=run_dir)
        runner.probes.trunks.remove()  # this worker's: its front probes are written out above
    failed = [(t.number, t.user_attrs.get("fail_reason", "unknown"))
              for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))]
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    stopped = [(t.number, t.user_attrs.get("early_stop_reason", "pruned"))
               for t in pruned if not t.user_attrs.get(SURPLUS_ATTR) and not was_not_run(t)]
    storage_str = _redact(storage_url) if storage_url else default_storage(run_root)
    return SearchOutcome(study=study, front=front, splits=splits, run_dir=run_dir,
                         storage=storage_str, failed=failed, stopped=stopped,
                         repeats=sum(1 for t in pruned if is_repeat(t)),
                         retired=sum(1 for t in pruned if is_retired(t)),
                         ran_instead=sum(1 for t in study.get_trials(deepcopy=False)
                                         if RAN_INSTEAD_ATTR in t.user_attrs and not was_not_run(t)))


def _blend(study: Any, runner: TrialRunner, *, cost: CostModel, limits: Limits) -> None:
    """Add a blend of the study's most accurate trials (``search/blend.py``). It runs after the budget:
    a second or two of arithmetic on stored logits, plus writing the chosen members' files, which the
    front's exports write anyway. A failure here never loses the search: it is logged, and the front
    is the trials'."""
    try:
        Blender(study=study, run_dir=runner.run_dir, labels={"validation": runner.splits.validation.labels,
                                                            "test": runner.splits.test.labels},
                cost=cost, limits=limits, modality=runner.modality, registry=runner.registry,
                name=runner.model_name(), data=runner.data_card(), worker=worker_identity(),
                floor=usefulness_floor(runner.splits.train.labels)).run()
    except Exception as exc:  # noqa: BLE001 - the trials' front stands without it
        logger.warning("could not blend the study's trials (%s: %s); the front holds the trials alone",
                       type(exc).__name__, exc)


def collect_after_work(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A full garbage collection after each trial that ran (Optuna's ``gc_after_trial``: the models a
    trial built hold reference cycles), but not after a draw not run (a repeated configuration, a
    retired option) or a surplus draw, which built nothing. With MiniLM loaded a collection takes
    0.25 s; after each of the 134 repeats of a 600 s man-page search, it took 33 s of the budget."""
    if not was_not_run(trial) and not trial.user_attrs.get(SURPLUS_ATTR):
        gc.collect()


def _configs_from_study(name: str, storage: Any, space: SearchSpace) -> list[dict[str, Any]]:
    """The Pareto-front configurations of another study that this search's space holds (its backbones,
    training modes, pruning methods and quantization: an unstructured-pruned one, say, is left out of a
    search without a size limit)."""
    try:
        other = optuna.load_study(study_name=name, storage=storage)
    except KeyError as exc:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ConfigError(f"No study {name!r} to warm-start from.{did_you_mean(name, names)} "
                          f"Studies in this storage: {names or 'none'}.") from exc
    choices = {"backbone": (*space.backbones, *space.ensembles), "train__mode": space.train__mode,
               "prune__method": space.prune__method, "quant__mode": space.quant__mode}
    ran = [dict(t.user_attrs.get("config") or t.params) for t in other.best_trials if not is_blend_trial(t)]
    return [c for c in ran if all(c.get(k, v[0]) in v for k, v in choices.items())]


def _redact(url: str) -> str:
    """A storage URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _write_front_exports(front: Sequence[FrontRow], *, modality: Modality, registry: BackboneRegistry) -> None:
    """Probe trials keep a head and a recipe; write the model files of those on the front."""
    for row in front:
        if row.artifact and is_recipe(row.artifact):
            try:
                materialize(row.artifact, modality=modality, registry=registry)
            except FileNotFoundError:
                if Path(row.artifact).is_dir():
                    raise
                # its worker removed it as dominated by trials this worker has not seen yet
                logger.warning("trial %d's files were removed by the worker that ran it", row.number)


def _remove_dominated_artifacts(study: Any, *, keep: set[int], run_dir: Path) -> None:
    """Delete the files of this worker's trials off the front (a dominated trial stays dominated): a text
    trial's export is ~200 MB, and a search keeps only what it can recommend. The study keeps their
    records. Other workers' trials are theirs to clean: one may still be writing out its front."""
    import shutil

    me = worker_identity()

    freed = 0
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False, states=finished):
        # A failed or stopped trial may have left partial files (never a loadable export: lepton.json
        # is written last); they go too.
        path = t.user_attrs.get("artifact") or str(run_dir / f"trial-{t.number:04d}")
        if t.number in keep or not Path(path).is_dir() or t.user_attrs.get(WORKER_ATTR, me) != me:
            continue
        if Path(path).resolve().parent != run_dir.resolve():
            continue  # only ever delete inside this study's own folder
        freed += sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
    if freed:
        logger.info("removed the files of trials off the front (%.0f MB); pass keep_all_artifacts=True "
                    "(--keep-all-artifacts) to keep them", freed / 2**20)


def quiet_optuna() -> None:
    """Optuna logs each trial at INFO; Lepton reports trials itself."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
