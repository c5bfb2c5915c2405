"""Search-quality benchmark: a default ``lepton search`` at ``--timeout 600`` on a set, against the hand probe.

For each set: run the search as a user would (default settings, a fresh study and feature cache), then
record the trials, the median wall time of probe trials, the longest trial, the front, and the test
accuracy of the front's best-validation point (never the best test number). The hand-written baseline
comes from ``benchmarks/hand_probe.py`` (run it first; its JSON is read). Writes one entry per set into
``benchmarks/results/search_quality.json`` and a plot of best validation/test accuracy over wall time.

    python benchmarks/build_glyph_images.py && python benchmarks/hand_probe.py --data benchmarks/data/glyphs \\
        --out benchmarks/results/hand_probe_glyphs.json
    python benchmarks/search_quality.py --data benchmarks/data/glyphs --set glyphs
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from hand_probe import content_digest  # benchmarks/, beside this script
from lepton_automl.data.split import split_data
from lepton_automl.search.engine import quiet_optuna, search
from lepton_image import ImageModality
from lepton_text import TextModality

HERE = Path(__file__).parent
OUT = HERE / "results"


def machine() -> str:
    """The CPU, its cores, and whether int8 runs on VNNI (its speed and accuracy differ without it)."""
    import os

    from lepton_automl.compression.quantization import saturating_int8

    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, int8 {'without' if saturating_int8() else 'with'} VNNI"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--set", required=True, help="name of the set in the results file")
    parser.add_argument("--budget", type=float, default=600.0)
    parser.add_argument("--keep", type=Path, default=None,
                        help="run the search in this folder and keep it (its study, trials' predictions)")
    args = parser.parse_args()
    quiet_optuna()
    hand = json.loads((OUT / f"hand_probe_{args.set}.json").read_text())
    splits = split_data((TextModality() if args.data.endswith((".csv", ".jsonl", ".tsv", ".parquet"))
                         else ImageModality()).load(args.data), validation=0.2, test=0.2, seed=0)
    if hand.get("data_digest") != content_digest(splits):
        raise SystemExit(f"hand_probe_{args.set}.json was computed on other data than {args.data} (the sets "
                         "are rebuilt from this machine's files). Rerun the baseline first: python "
                         f"benchmarks/hand_probe.py --data {args.data} --out {OUT / f'hand_probe_{args.set}.json'}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="lepton-quality-"))
    start = time.time()
    outcome = search(args.data, run_root=work, n_trials=10_000, timeout=args.budget, seed=0)
    wall = time.time() - start
    study = outcome.study
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    durations = {t.number: (t.datetime_complete - t.datetime_start).total_seconds()
                 for t in trials if t.datetime_complete and t.datetime_start}
    def config(t):  # what ran (the objective may override what the sampler drew)
        return t.user_attrs.get("config") or t.params

    probe_trials = [t for t in done if not t.user_attrs.get("blend") and config(t).get("train__mode", "probe") == "probe"
                    and config(t).get("prune__method", "none") == "none" and t.number in durations]
    probes = [durations[t.number] for t in probe_trials if t.user_attrs.get("cache_hit")]  # the measure
    # ... split by whether the trial built its trunk entry (export, int8 quantization and the quantized
    # trunk's features, measurement) or found it built by an earlier trial
    reusing = [durations[t.number] for t in probe_trials
               if t.user_attrs.get("cache_hit") and t.user_attrs.get("trunk_built") is False]
    building = [durations[t.number] for t in probe_trials
                if t.user_attrs.get("cache_hit") and t.user_attrs.get("trunk_built")]
    probes_all = [durations[t.number] for t in probe_trials]  # features extracted in the trial included
    front = sorted(outcome.front, key=lambda r: r.latency_ms)
    best = max(front, key=lambda r: (r.accuracy, -r.latency_ms))
    # best validation (and that point's test) accuracy over wall time, trial by trial
    t0 = min(t.datetime_start for t in trials if t.datetime_start)
    curve, best_val, best_test = [], -1.0, None
    for t in sorted(done, key=lambda t: t.datetime_complete):
        if t.values[0] > best_val and all(v <= 0 for v in t.constraints.values()):
            best_val, best_test = t.values[0], t.user_attrs.get("test_accuracy")
        curve.append([(t.datetime_complete - t0).total_seconds(), best_val, best_test])
    stage_totals: dict[str, float] = {}
    for t in trials:
        for stage, seconds in (t.user_attrs.get("stage_seconds") or {}).items():
            stage_totals[stage] = stage_totals.get(stage, 0.0) + seconds
    total_stage = sum(stage_totals.values()) or 1.0
    entry = {
        "set": args.set, "modality": study.user_attrs.get("modality"), "budget_s": args.budget,
        "wall_s": round(wall, 1), "trials": len(done), "trials_started": len(trials),
        "states": {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState},
        "median_probe_trial_s": round(float(np.median(probes)), 2) if probes else None,
        "probe_trials_on_cached_features": len(probes),
        "median_probe_trial_reusing_trunk_s": round(float(np.median(reusing)), 2) if reusing else None,
        "probe_trials_reusing_trunk": len(reusing),
        "median_probe_trial_building_trunk_s": round(float(np.median(building)), 2) if building else None,
        "probe_trials_building_trunk": len(building),
        "median_probe_trial_all_s": round(float(np.median(probes_all)), 2) if probes_all else None,
        "probe_trials": len(probes_all),
        "max_trial_s": round(max(durations.values()), 1) if durations else None,
        "best_val_accuracy": best.accuracy, "best_test_accuracy": best.test_accuracy,
        "best_params": best.params, "best_latency_ms": best.latency_ms,
        "baseline_test_accuracy": hand["test_accuracy"], "baseline_val_accuracy": hand["val_accuracy"],
        "front": [[r.accuracy, r.test_accuracy, r.latency_ms] for r in front],
        "stage_seconds": {k: round(v, 1) for k, v in stage_totals.items()},
        "stage_share": {k: round(v / total_stage, 3) for k, v in stage_totals.items()},
        "curve": curve, "machine": machine(),
        "failed": outcome.failed, "stopped": outcome.stopped, "repeats": outcome.repeats, "retired": outcome.retired,
        "ran_instead": outcome.ran_instead,
        "trial_seconds": {str(k): round(v, 1) for k, v in durations.items()},
        "trial_params": {str(t.number): config(t) for t in trials},
        # each completed trial's [validation accuracy (the objective), test accuracy, latency ms]
        "trial_values": {str(t.number): [t.values[0], t.user_attrs.get("test_accuracy"), t.values[1]] for t in done},
        "trial_stage_seconds": {str(t.number): t.user_attrs["stage_seconds"] for t in trials
                                if t.user_attrs.get("stage_seconds")},
    }
    path = OUT / "search_quality.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    results = [r for r in results if r["set"] != args.set] + [entry]
    path.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in entry.items() if k not in ("curve", "trial_seconds", "trial_params",
                                                                   "trial_stage_seconds", "trial_values")},
                     indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [c[0] for c in curve]
        ax.step(xs, [c[1] for c in curve], where="post", label="Lepton: best validation accuracy")
        ax.step(xs, [c[2] if c[2] is not None else np.nan for c in curve], where="post",
                label="Lepton: that point's test accuracy")
        ax.axhline(hand["test_accuracy"], color="gray", linestyle="--", label="hand probe: test accuracy")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{args.set}: --timeout {args.budget:.0f}, 2 cores")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / f"search_quality_{args.set}.png", dpi=120)
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no plot")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
