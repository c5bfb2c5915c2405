"""The search report: one self-contained HTML page (works offline: plotly's script is inlined) with

- the Pareto front: validation accuracy against batch-1 latency, cost as colour, the recommended
  trial marked, the ``--max-latency-ms`` / ``--min-accuracy`` limits drawn;
- the optimization history: best feasible accuracy over wall time, every trial as a point;
- parameter importances per objective (Optuna's default evaluator);
- every trial in a table: state, duration, configuration, metrics, failure or early-stop reason and
  constraint violations;
- the recommendation and why.

``write_pngs`` draws the two main plots as PNG files (matplotlib) for terminal users.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton_automl.log import get_logger
from lepton_automl.search.front import FrontRow

logger = get_logger(__name__)

OBJECTIVES = ("validation accuracy", "latency (ms)", "cost (USD)")


@dataclass(frozen=True)
class Recommendation:
    number: int
    why: str


def describe_config(config: Mapping[str, Any]) -> str:
    """A trial's configuration in words: 'efficientnet_lite0, 224 px, probe, int8'; a blend's, its members'."""
    if config.get("blend"):
        return "blend of " + " + ".join(f"trial {n} x{w:.2f} ({describe_config(m)})" for n, w, m in
                                        zip(config["blend"], config["weights"], config.get("members") or [{}] * 99))
    parts = [str(config.get("backbone", "?"))]
    if config.get("data__image_size"):
        parts.append(f"{config['data__image_size']} px")
    if config.get("data__max_length"):
        parts.append(f"{config['data__max_length']} tokens")
    mode = config.get("train__mode", "probe")
    if mode == "finetune":
        parts.append(f"fine-tune last {config.get('train__blocks', '?')} block(s), {config.get('train__epochs', '?')} epochs")
    elif mode == "full":
        parts.append(f"full fine-tune, {config.get('train__epochs', '?')} epochs")
    else:
        parts.append("linear probe")
    if mode != "probe" and config.get("optim__lr"):
        parts.append(f"lr {float(config['optim__lr']):.1e}")
    prune = config.get("prune__method", "none")
    if prune not in (None, "none"):
        target = f" {config['prune__target']}" if config.get("prune__target") else ""
        parts.append(f"{prune}{target} pruning {float(config.get('prune__amount', 0)):.0%}")
    parts.append(str(config.get("quant__mode", "none")) if config.get("quant__mode") not in (None, "none") else "fp32")
    return ", ".join(parts)


def _config(trial: Any) -> dict[str, Any]:
    return dict(trial.user_attrs.get("config") or trial.params)


def _feasible(trial: Any) -> bool:
    return all(v <= 0 for v in (trial.constraints or {}).values())


def _violations(trial: Any) -> str:
    """The hard limits a trial broke: 'max_latency_ms over by 0.4'."""
    return "; ".join(f"{name} over by {value:.4g}" for name, value in sorted((trial.constraints or {}).items())
                     if value > 0)


def _front_figure(done: Sequence[Any], front: Sequence[FrontRow], recommended: Recommendation | None,
                  limits: Mapping[str, float | None]) -> Any:
    import plotly.graph_objects as go

    on_front = {r.number for r in front}
    costs = [t.values[2] for t in done] or [0.0]
    fig = go.Figure()
    for label, trials, symbol, size in (("other trials", [t for t in done if t.number not in on_front], "circle-open", 9),
                                        ("Pareto front", [t for t in done if t.number in on_front], "diamond", 12)):
        fig.add_trace(go.Scatter(
            x=[t.values[1] for t in trials], y=[t.values[0] for t in trials], mode="markers", name=label,
            marker={"symbol": symbol, "size": size, "color": [t.values[2] for t in trials], "colorscale": "Viridis",
                    "cmin": min(costs), "cmax": max(costs), "showscale": label == "Pareto front",
                    "colorbar": {"title": {"text": "cost (USD)"}, "x": 1.02}},
            text=[f"trial {t.number}: {html.escape(describe_config(_config(t)))}" for t in trials],
            hovertemplate="%{text}<br>%{x:.3f} ms, accuracy %{y:.4f}<extra></extra>"))
    if recommended is not None:
        rec = next((t for t in done if t.number == recommended.number), None)
        if rec is not None:
            fig.add_trace(go.Scatter(x=[rec.values[1]], y=[rec.values[0]], mode="markers+text",
                                     name=f"recommended (trial {rec.number})", text=[f"trial {rec.number}"],
                                     textposition="top center",
                                     marker={"symbol": "star", "size": 20, "color": "crimson",
                                             "line": {"width": 1, "color": "black"}}))
    if limits.get("max_latency_ms"):
        fig.add_vline(x=float(limits["max_latency_ms"]), line_dash="dash", line_color="firebrick",
                      annotation_text="--max-latency-ms", annotation_position="top left")
    if limits.get("min_accuracy"):
        fig.add_hline(y=float(limits["min_accuracy"]), line_dash="dash", line_color="firebrick",
                      annotation_text="--min-accuracy", annotation_position="bottom right")
    fig.update_layout(title="Accuracy against latency (colour: cost)", xaxis_title="latency, batch 1 (ms, log scale)",
                      yaxis_title="validation accuracy", xaxis_type="log", template="plotly_white",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0},
                      margin={"t": 90, "r": 120}, height=520)
    return fig


def _history(trials: Sequence[Any]) -> tuple[list[float], list[float], list[float], list[float], list[int]]:
    """(seconds of each finished trial, its accuracy, the best feasible accuracy so far) from the first start."""
    finished = sorted((t for t in trials if t.datetime_complete is not None and t.values),
                      key=lambda t: t.datetime_complete)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if not finished or not starts:
        return [], [], [], [], []
    t0 = min(starts)
    xs, ys, best_x, best_y, numbers = [], [], [], [], []
    best = None
    for t in finished:
        seconds = (t.datetime_complete - t0).total_seconds()
        xs.append(seconds)
        ys.append(t.values[0])
        numbers.append(t.number)
        if _feasible(t) and (best is None or t.values[0] > best):
            best = t.values[0]
        if best is not None:
            best_x.append(seconds)
            best_y.append(best)
    return xs, ys, best_x, best_y, numbers


def _history_figure(trials: Sequence[Any]) -> Any:
    import plotly.graph_objects as go

    xs, ys, best_x, best_y, numbers = _history(trials)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="trial", text=[f"trial {n}" for n in numbers],
                             marker={"size": 8, "color": "steelblue"},
                             hovertemplate="%{text}: %{y:.4f} at %{x:.0f} s<extra></extra>"))
    fig.add_trace(go.Scatter(x=best_x, y=best_y, mode="lines", name="best feasible so far", line={"shape": "hv"}))
    fig.update_layout(title="Optimization history", xaxis_title="wall time since the first trial started (s)",
                      yaxis_title="validation accuracy", template="plotly_white", height=420,
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0})
    return fig


def importances(study: Any) -> dict[str, dict[str, float]] | str:
    """Optuna's parameter importances per objective, or why they cannot be computed yet."""
    import warnings

    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 4:
        return f"needs at least 4 complete trials ({len(complete)} so far)"
    out: dict[str, dict[str, float]] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, name in enumerate(OBJECTIVES):
                out[name] = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
    except Exception as exc:  # conditional spaces with few trials can have no parameter common to all
        return f"not computable on these trials ({type(exc).__name__}: {exc})"
    return out


def _importance_figure(imp: Mapping[str, Mapping[str, float]]) -> Any:
    import plotly.graph_objects as go

    params = sorted({p for values in imp.values() for p in values})
    fig = go.Figure()
    for name, values in imp.items():
        fig.add_trace(go.Bar(y=params, x=[values.get(p, 0.0) for p in params], name=name, orientation="h"))
    fig.update_layout(title="Parameter importances per objective (Optuna)", barmode="group", template="plotly_white",
                      xaxis_title="importance", height=max(300, 60 * len(params)),
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0})
    return fig


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "<td></td>"
    try:
        text = format(value, spec) if spec else str(value)
    except (TypeError, ValueError):
        text = str(value)
    return f"<td>{html.escape(text)}</td>"


def _trial_rows(trials: Sequence[Any], front: set[int], recommended: int | None) -> str:
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        ua = t.user_attrs
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete is not None and t.datetime_start is not None else None)
        values = t.values or [None, None, None]
        reason = ua.get("fail_reason") or ua.get("early_stop_reason") or ""
        mark = " recommended" if t.number == recommended else (" front" if t.number in front else "")
        rows.append(f'<tr class="{t.state.name.lower()}{mark}">' + "".join((
            _cell(t.number), _cell(t.state.name + (" (front)" if t.number in front else "")),
            _cell(seconds, ".1f"), _cell(describe_config(_config(t)) if _config(t) else ""),
            _cell(values[0], ".4f"), _cell(ua.get("test_accuracy"), ".4f"), _cell(values[1], ".3f"),
            _cell(values[2], ".5f"), _cell(ua.get("size_mb"), ".2f"), _cell(reason), _cell(_violations(t)))) + "</tr>")
    return "\n".join(rows)


def write_html_report(path: str | Path, study: Any, front: Sequence[FrontRow], *, title: str,
                      recommended: Recommendation | None = None,
                      limits: Mapping[str, float | None] | None = None) -> Path:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    limits = dict(limits or study.user_attrs.get("limits") or {})
    front_fig = _front_figure(done, front, recommended, limits)
    history_fig = _history_figure(trials)
    imp = importances(study)
    imp_html = (_importance_figure(imp).to_html(full_html=False, include_plotlyjs=False, div_id="importances")
                if isinstance(imp, dict) else f"<p>Parameter importances: {html.escape(imp)}.</p>")
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    rec_html = ""
    if recommended is not None:
        row = next((r for r in front if r.number == recommended.number), None)
        config = describe_config(row.params) if row is not None else ""
        rec_html = (f'<section id="recommendation"><h2>Recommendation</h2><p><b>Trial {recommended.number}</b>'
                    f" ({html.escape(config)}): {html.escape(recommended.why)}.</p></section>")
    front_rows_html = "\n".join(
        "<tr>" + "".join((_cell(r.number), _cell(r.accuracy, ".4f"), _cell(r.test_accuracy, ".4f"),
                          _cell(r.latency_ms, ".3f"), _cell(r.cost_usd, ".5f"), _cell(r.size_mb, ".2f"),
                          _cell(r.params_m, ".2f"), _cell(r.gmacs, ".3f"), _cell(describe_config(r.params)))) + "</tr>"
        for r in sorted(front, key=lambda r: r.latency_ms))
    limit_text = ", ".join(f"{k} = {v}" for k, v in limits.items() if v is not None) or "none"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:left}}tr.fail td{{background:#fdecea}}
tr.pruned td{{background:#f4f4f4;color:#555}}tr.recommended td{{background:#fff4d6;font-weight:bold}}
tr.front td:first-child{{border-left:4px solid #2a7}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Study <code>{html.escape(study.study_name)}</code>: {len(trials)} trials ({html.escape(json.dumps(counts))}).
Hard limits: {html.escape(limit_text)}.</p>
{rec_html}
<section id="front">{front_fig.to_html(full_html=False, include_plotlyjs=True, div_id="front-plot")}
<h2>Pareto front</h2><table><tr><th>trial</th><th>val acc</th><th>test acc</th><th>latency ms</th><th>cost USD</th>
<th>size MB</th><th>params M</th><th>GMACs</th><th>configuration</th></tr>{front_rows_html}</table></section>
<section id="history">{history_fig.to_html(full_html=False, include_plotlyjs=False, div_id="history-plot")}</section>
<section id="importance">{imp_html}</section>
<section id="trials"><h2>Every trial</h2><table><tr><th>trial</th><th>state</th><th>seconds</th><th>configuration</th>
<th>val acc</th><th>test acc</th><th>latency ms</th><th>cost USD</th><th>size MB</th><th>why it stopped or failed</th>
<th>constraint violations</th></tr>
{_trial_rows(trials, {r.number for r in front}, recommended.number if recommended else None)}</table></section>
<p>Open the study in optuna-dashboard for more: <code>optuna-dashboard STORAGE_URL</code>.</p>
</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def write_pngs(directory: str | Path, study: Any, front: Sequence[FrontRow], *,
               recommended: Recommendation | None = None) -> list[Path]:
    """``front.png`` and ``history.png`` (matplotlib) beside the HTML report."""
    try:
        import matplotlib
    except ImportError:
        from lepton_automl.exceptions import ConfigError

        raise ConfigError("PNG plots need matplotlib: `.venv/bin/pip install matplotlib`.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    on_front = {r.number for r in front}
    fig, ax = plt.subplots(figsize=(8, 5))
    points = ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], c=[t.values[2] for t in done],
                        cmap="viridis", marker="o", s=[70 if t.number in on_front else 25 for t in done])
    fig.colorbar(points, ax=ax, label="cost (USD)")
    line = sorted(front, key=lambda r: r.latency_ms)
    ax.step([r.latency_ms for r in line], [r.accuracy for r in line], where="post", color="gray", label="Pareto front")
    if recommended is not None:
        rec = next((t for t in done if t.number == recommended.number), None)
        if rec is not None:
            ax.scatter([rec.values[1]], [rec.values[0]], marker="*", s=300, color="crimson",
                       label=f"recommended (trial {rec.number})", zorder=5)
    ax.set_xscale("log")
    front_png = _save(fig, ax, directory / "front.png", xlabel="latency, batch 1 (ms, log scale)",
                      title="Accuracy against latency")
    xs, ys, best_x, best_y, _ = _history(trials)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter(xs, ys, s=18, label="trial")
    ax.step(best_x, best_y, where="post", color="darkorange", label="best feasible so far")
    history_png = _save(fig, ax, directory / "history.png", xlabel="wall time since the first trial started (s)",
                        title="Optimization history")
    return [front_png, history_png]


def _save(fig: Any, ax: Any, path: Path, *, xlabel: str, title: str) -> Path:
    """Label (validation accuracy up the side), write ``path`` and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
