"""Search benchmark: hypervolume over time, samplers, a hand-written baseline, cache and early stopping.

At equal wall-clock budgets on one dataset (digits, or the Debian text set):

- ``lepton``: the default search (multi-objective TPE, warm start, early stopping, feature cache);
- ``nsga2``: the same with NSGA-II; ``random``: Optuna's RandomSampler over the same space, no warm
  start and no early stopping;
- ``dry-run``: the default search with early stopping in dry-run mode: every trial runs to the end and
  records when early stopping would have stopped it, which measures the saving on paired trials;
- ``no-cache``: the trials of ``dry-run`` replayed in order (same parameters and seeds) with the
  feature cache emptied after every trial: the time the cache saves at equal front quality;
- ``baseline``: what a user writes by hand: the smallest backbone's pretrained features at its native
  input size, scikit-learn's LogisticRegression, served by PyTorch (latency also taken in ONNX Runtime);
- ``probe-only``: a linear-probe-only search, two weight decays per backbone at the native input size,
  against one forward pass over all the data per backbone.

Hypervolume is taken over (validation accuracy, latency) of the feasible completed trials, in
accuracy x decades of latency below a reference of 100 ms (``lepton_automl.search.front.hypervolume``).

    python benchmarks/search.py --dataset digits --budget 180
    python benchmarks/search.py --dataset text --budget 240

Writes benchmarks/results/search_<dataset>.json and .png. Needs the ``bench`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.cost.latency import measure_onnx_latency
from lepton_automl.data.demo import materialize_digits
from lepton_automl.data.split import split_data
from lepton_automl.export.onnx import export_onnx
from lepton_automl.plugins import MODALITIES, PluginRegistry
from lepton_automl.search.early_stopping import EarlyStopping
from lepton_automl.search.engine import DIRECTIONS, quiet_optuna, search
from lepton_automl.search.front import hypervolume
from lepton_automl.export.trunk import run_trunk, run_trunk_fast
from lepton_automl.interfaces import ExportModel

HERE = Path(__file__).parent
OUT = HERE / "results"
REF_MS = 100.0
REPLAY = 10  # trials of the dry run replayed without the cache (the replay is the slow part)
SEARCHES = {
    "lepton": {"sampler": "tpe", "early_stopping": EarlyStopping(), "warm_start": True},
    "dry-run": {"sampler": "tpe", "early_stopping": EarlyStopping(dry_run=True), "warm_start": True},
    "nsga2": {"sampler": "nsga2", "early_stopping": EarlyStopping(), "warm_start": True},
    "random": {"sampler": "random", "early_stopping": None, "warm_start": False},
}


def dataset(name: str) -> tuple[str, str]:
    if name == "digits":
        return str(materialize_digits()), "image"
    path = HERE / "data" / "debian_sections.csv"
    if not path.is_file():
        subprocess.run([sys.executable, str(HERE / "build_debian_text.py"), "--out", str(path)], check=True)
    return str(path), "text"


def trial_records(study: Any, t0: float) -> list[dict[str, Any]]:
    out = []
    for t in study.trials:
        if t.datetime_complete is None:
            continue
        ua = t.user_attrs
        out.append({
            "number": t.number, "state": t.state.name, "params": t.params,
            "values": list(t.values) if t.values else None,
            "feasible": t.state.name == "COMPLETE" and all(c <= 0 for c in t.constraints.values()),
            "start_s": t.datetime_start.timestamp() - t0, "end_s": t.datetime_complete.timestamp() - t0,
            "duration_s": (t.datetime_complete - t.datetime_start).total_seconds(),
            **{k: ua.get(k) for k in ("test_accuracy", "cache_hit", "early_stop_reason", "early_stop_would_stop_s",
                                      "curve", "fail_reason", "gmacs")},
        })
    return out


def hv_curve(trials: list[dict[str, Any]], *, skip: set[int] = frozenset()) -> list[tuple[float, float]]:
    done = sorted((t for t in trials if t["feasible"] and t["number"] not in skip), key=lambda t: t["end_s"])
    pts, curve = [], []
    for t in done:
        pts.append((t["values"][0], t["values"][1]))
        curve.append((round(t["end_s"], 1), round(hypervolume(pts, ref_latency_ms=REF_MS), 5)))
    return curve


def summary(trials: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    feasible = [t for t in trials if t["feasible"]]
    best = max(feasible, key=lambda t: t["values"][0], default=None)
    states = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return {"wall_s": round(wall, 1), "trials": states, "trial_seconds": round(sum(t["duration_s"] for t in trials), 1),
            "hypervolume": (hv_curve(trials) or [(0, 0.0)])[-1][1],
            "best_val_accuracy": best and best["values"][0], "best_test_accuracy": best and best["test_accuracy"],
            "best_latency_ms": best and best["values"][1]}


def run_search(name: str, data: str, modality: str, budget: float, seed: int, root: Path,
               enqueue: list[dict[str, Any]] | None = None, clear_cache: bool = False,
               **kwargs: Any) -> dict[str, Any]:
    run_root = root / name
    storage = f"sqlite:///{run_root / 'bench.db'}"
    run_root.mkdir(parents=True)
    callbacks = []
    if enqueue:
        study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS))
        for params in enqueue:
            study.enqueue_trial(params)
    if clear_cache:
        callbacks.append(lambda study, trial: shutil.rmtree(run_root / "feature-cache", ignore_errors=True))
    print(f"[{time.strftime('%H:%M:%S')}] {name}: searching for {budget:.0f} s", flush=True)
    t0 = time.time()
    outcome = search(data, modality=modality, storage=storage, study_name=name, seed=seed, run_root=run_root,
                     n_trials=len(enqueue) if enqueue else 10_000, timeout=budget, callbacks=callbacks, **kwargs)
    wall = time.time() - t0
    trials = trial_records(outcome.study, t0)
    result = {"summary": summary(trials, wall), "hypervolume_over_time": hv_curve(trials), "trials": trials}
    print(f"  {json.dumps(result['summary'])}", flush=True)
    return result


def early_stopping_saving(dry: dict[str, Any]) -> dict[str, Any]:
    """What early stopping would have saved on the dry-run search, and the front it would have kept."""
    trials = dry["trials"]
    total = sum(t["duration_s"] for t in trials)
    would = [t for t in trials if t["early_stop_would_stop_s"] is not None]
    saved = sum(max(0.0, t["duration_s"] - t["early_stop_would_stop_s"]) for t in would)
    trainable = [t for t in trials if t["params"].get("train__mode") == "finetune"
                 or t["params"].get("prune__method") == "structured"]
    hv_all = (hv_curve(trials) or [(0, 0.0)])[-1][1]
    hv_kept = (hv_curve(trials, skip={t["number"] for t in would}) or [(0, 0.0)])[-1][1]
    return {"trials": len(trials), "would_stop": len(would), "trial_seconds": round(total, 1),
            "saved_seconds": round(saved, 1), "saved_fraction_of_all_trial_time": round(saved / max(total, 1e-9), 3),
            "saved_fraction_of_trainable_trial_time": round(
                saved / max(sum(t["duration_s"] for t in trainable), 1e-9), 3),
            "hypervolume_all": hv_all, "hypervolume_without_stopped": hv_kept,
            "reasons": [t["early_stop_reason"] for t in would]}


def latency_input(mod: Any, train: Any, prep: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train), size=min(64, len(train)), replace=False)
    encoded = [mod.encode([train.examples[i]], preprocessing=prep) for i in idx]
    return max(encoded, key=lambda e: sum(v.size for v in e.values()))


def baseline(data: str, modality: str, seed: int, tmp: Path) -> dict[str, Any]:
    """A user's script: pretrained features of the smallest backbone at its native size + LogisticRegression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.time()
    registry = BackboneRegistry()
    mod = PluginRegistry(MODALITIES).load(modality)()
    splits = split_data(mod.load(data), seed=seed)
    card = min(registry.list(modality=mod.backbones_from(), available=True), key=lambda c: c.params_m or 0.0)
    params = mod.warm_start_variants(card)[0]
    parts = mod.build(card, registry, params=params, finetune_blocks=0, pretrained=True)
    prep = mod.preprocessing(card, registry, params=params)
    feats = {s: np.asarray(run_trunk(parts.trunk, mod, getattr(splits, s).examples, preprocessing=prep)[0])
             for s in ("train", "validation", "test")}
    scaler = StandardScaler().fit(feats["train"])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(feats["train"]), splits.train.labels)
    acc = {s: float(clf.score(scaler.transform(feats[s]), getattr(splits, s).labels)) for s in ("validation", "test")}
    wall = time.time() - t0
    linear = torch.nn.Linear(feats["train"].shape[1], len(splits.classes))
    with torch.no_grad():  # the scaler folded into the classifier
        w = torch.as_tensor(clf.coef_ / scaler.scale_, dtype=torch.float32)
        linear.weight.copy_(w)
        linear.bias.copy_(torch.as_tensor(clf.intercept_ - (clf.coef_ / scaler.scale_) @ scaler.mean_,
                                          dtype=torch.float32))
    model = ExportModel(parts.trunk, parts.tail, linear).eval()
    feeds = latency_input(mod, splits.train, prep, seed)
    args = [torch.from_numpy(feeds[n]) for n in mod.input_names()]
    with torch.inference_mode():
        for _ in range(5):
            model(*args)
        times = []
        for _ in range(50):
            s = time.perf_counter()
            model(*args)
            times.append((time.perf_counter() - s) * 1e3)
    onnx_path = export_onnx(model, feeds, tmp / "baseline.onnx", input_names=mod.input_names(),
                            dynamic_axes=mod.dynamic_axes())
    ort_ms = measure_onnx_latency(onnx_path, feeds).median_ms
    out = {"backbone": card.name, "params": params, "val_accuracy": acc["validation"], "test_accuracy": acc["test"],
           "latency_eager_ms": float(np.median(times)), "latency_ort_ms": ort_ms, "wall_s": round(wall, 1)}
    print(f"  baseline {json.dumps(out)}", flush=True)
    return out


def probe_only(data: str, modality: str, seed: int, root: Path) -> dict[str, Any]:
    """A probe-only search over every available backbone vs one forward pass over the data each."""
    registry = BackboneRegistry()
    mod = PluginRegistry(MODALITIES).load(modality)()
    splits = split_data(mod.load(data), seed=seed)
    cards = registry.list(modality=mod.backbones_from(), available=True)
    forward, configs = {}, []
    for card in cards:
        params = mod.warm_start_variants(card)[0]
        parts = mod.build(card, registry, params=params, finetune_blocks=0, pretrained=True)
        prep = mod.preprocessing(card, registry, params=params)
        everything = [*splits.train.examples, *splits.validation.examples, *splits.test.examples]
        t = time.perf_counter()
        run_trunk_fast(parts.trunk, mod, everything, preprocessing=prep)
        forward[card.name] = round(time.perf_counter() - t, 2)
        for wd in (1e-4, 1e-3):
            configs.append({"backbone": card.name, **params, "train__mode": "probe", "optim__weight_decay": wd,
                            "prune__method": "none", "quant__mode": "none"})
    res = run_search("probe-only", data, modality, 3600, seed, root, enqueue=configs, warm_start=False,
                     space_options={"train__mode": ("probe",), "prune__method": ("none",), "quant__mode": ("none",)})
    total_forward = sum(forward.values())
    return {"backbones": [c.name for c in cards], "trials": len(configs), "forward_pass_s": forward,
            "search_wall_s": res["summary"]["wall_s"], "trial_seconds": res["summary"]["trial_seconds"],
            "ratio_wall_to_forward": round(res["summary"]["wall_s"] / total_forward, 2),
            "ratio_trials_to_forward": round(res["summary"]["trial_seconds"] / total_forward, 2)}


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, res in results["searches"].items():
        curve = res["hypervolume_over_time"]
        if curve:
            xs, ys = zip(*curve)
            ax1.step(xs, ys, where="post", label=name)
        pts = sorted((t["values"][1], t["values"][0]) for t in res["trials"] if t["feasible"])
        if pts:
            ax2.scatter(*zip(*pts), s=12, label=name, alpha=0.7)
    b = results.get("baseline")
    if b:
        hv = hypervolume([(b["val_accuracy"], b["latency_eager_ms"])], ref_latency_ms=REF_MS)
        ax1.scatter([b["wall_s"]], [hv], marker="*", s=150, color="k", label="hand-written baseline", zorder=5)
        ax2.scatter([b["latency_eager_ms"], b["latency_ort_ms"]], [b["val_accuracy"]] * 2, marker="*", s=150,
                    color="k", label="baseline (torch, ORT)", zorder=5)
    ax1.set(xlabel="wall-clock seconds", ylabel=f"hypervolume (accuracy x decades below {REF_MS:.0f} ms)",
            title="front quality over time")
    ax2.set(xscale="log", xlabel="latency ms (batch 1)", ylabel="validation accuracy", title="feasible trials")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "text"), default="digits")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per search (Optuna timeout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: lepton dry-run nsga2 random no-cache baseline probe-only")
    args = parser.parse_args()
    quiet_optuna()
    data, modality = dataset(args.dataset)
    wanted = set(args.only or ["lepton", "dry-run", "nsga2", "random", "no-cache", "baseline", "probe-only"])
    OUT.mkdir(parents=True, exist_ok=True)
    out_json = OUT / f"search_{args.dataset}.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() and args.only else {}
    results.setdefault("searches", {})
    results.update({"dataset": args.dataset, "budget_s": args.budget, "seed": args.seed,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                "optuna": optuna.__version__},
                    "date": time.strftime("%Y-%m-%d")})

    def save() -> None:
        out_json.write_text(json.dumps(results, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as tmp:
        root = Path(tmp)
        if "baseline" in wanted:
            results["baseline"] = baseline(data, modality, args.seed, root)
            save()
        for name, kwargs in SEARCHES.items():
            if name in wanted:
                results["searches"][name] = run_search(name, data, modality, args.budget, args.seed, root, **kwargs)
                save()
        if "dry-run" in results["searches"]:
            results["early_stopping"] = early_stopping_saving(results["searches"]["dry-run"])
            save()
        if "no-cache" in wanted and "dry-run" in results["searches"]:
            dry = results["searches"]["dry-run"]
            replay = [t["params"] for t in sorted(dry["trials"], key=lambda t: t["number"])][:REPLAY]
            res = run_search("no-cache", data, modality, 4 * args.budget, args.seed, root, enqueue=replay,
                             clear_cache=True, warm_start=False, early_stopping=None)
            n = len(res["trials"])
            with_cache = sum(t["duration_s"] for t in sorted(dry["trials"], key=lambda t: t["number"])[:n])
            results["cache"] = {"trials_replayed": n, "trial_seconds_with_cache": round(with_cache, 1),
                                "trial_seconds_without_cache": res["summary"]["trial_seconds"],
                                "hypervolume_with_cache": (hv_curve(dry["trials"][:n]) or [(0, 0.0)])[-1][1],
                                "hypervolume_without_cache": res["summary"]["hypervolume"]}
            results["searches"]["no-cache"] = res
            save()
        if "probe-only" in wanted:
            results["probe_only"] = probe_only(data, modality, args.seed, root)
            save()
    plot(results, OUT / f"search_{args.dataset}.png", f"{args.dataset}: {args.budget:.0f} s per search, seed {args.seed}")
    print(f"wrote {out_json}", flush=True)


if __name__ == "__main__":
    main()
