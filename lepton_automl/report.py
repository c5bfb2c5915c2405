"""The Pareto-front report: a self-contained HTML page with a plotly chart and the front's table."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lepton_automl.search.front import FrontRow


def write_html_report(path: str | Path, study: Any, front: Sequence[FrontRow], *, title: str) -> Path:
    import plotly.graph_objects as go

    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    on_front = {r.number for r in front}
    fig = go.Figure()
    for label, trials, symbol in (
        ("other trials", [t for t in done if t.number not in on_front], "circle-open"),
        ("Pareto front", [t for t in done if t.number in on_front], "diamond"),
    ):
        fig.add_trace(
            go.Scatter(
                x=[t.values[1] for t in trials],
                y=[t.values[0] for t in trials],
                mode="markers",
                name=label,
                marker={"symbol": symbol, "size": 11, "color": [t.values[2] for t in trials],
                        "colorscale": "Viridis", "showscale": label == "Pareto front",
                        "colorbar": {"title": "cost USD"}},
                text=[f"trial {t.number}<br>{t.params}" for t in trials],
                hoverinfo="text+x+y",
            )
        )
    fig.update_layout(title=title, xaxis_title="latency, batch 1 (ms, log)", yaxis_title="validation accuracy",
                      xaxis_type="log", template="plotly_white")
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.number, f"{r.accuracy:.4f}", "" if r.test_accuracy is None else f"{r.test_accuracy:.4f}",
            f"{r.latency_ms:.3f}", f"{r.cost_usd:.5f}", "" if r.size_mb is None else f"{r.size_mb:.2f}",
            r.params.get("backbone"), r.params.get("train__mode"), r.params.get("quant__mode"),
            {k: v for k, v in r.params.items() if k.startswith("data__")},
        )) + "</tr>"
        for r in front
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body><h1>{html.escape(title)}</h1>
{fig.to_html(full_html=False, include_plotlyjs=True)}
<h2>Pareto front</h2><table><tr><th>trial</th><th>val acc</th><th>test acc</th><th>latency ms</th><th>cost USD</th>
<th>size MB</th><th>backbone</th><th>training</th><th>quant</th><th>data</th></tr>{rows}</table></body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
