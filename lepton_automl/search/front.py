"""The Pareto front of a study, as rows, and the rule that names one recommended trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lepton_automl.exceptions import ConfigError

PICK_RULES = ("balanced", "accuracy", "latency", "knee")


@dataclass(frozen=True)
class FrontRow:
    number: int
    accuracy: float
    latency_ms: float
    cost_usd: float
    test_accuracy: float | None
    latency_p90_ms: float | None
    size_mb: float | None
    params_m: float | None
    gmacs: float | None
    params: dict[str, Any]
    artifact: str | None


def front_rows(study: Any) -> list[FrontRow]:
    """Feasible, completed, non-dominated trials, fastest first."""
    rows = []
    for t in study.best_trials:
        ua = t.user_attrs
        rows.append(
            FrontRow(
                number=t.number, accuracy=t.values[0], latency_ms=t.values[1], cost_usd=t.values[2],
                test_accuracy=ua.get("test_accuracy"), latency_p90_ms=ua.get("latency_p90_ms"),
                size_mb=ua.get("size_mb"), params_m=ua.get("params_m"), gmacs=ua.get("gmacs"),
                params=dict(t.user_attrs.get("config") or t.params),  # what ran, after overrides
                artifact=ua.get("artifact"),
            )
        )
    return sorted(rows, key=lambda r: (r.latency_ms, -r.accuracy))


def pick(rows: list[FrontRow], *, rule: str = "balanced", tolerance: float = 0.01) -> tuple[FrontRow, str]:
    """Name one trial of the front and say why.

    - ``accuracy``: the most accurate (ties: the faster);
    - ``latency``: the fastest;
    - ``balanced``: the fastest whose validation accuracy is within ``tolerance`` of the best;
    - ``knee``: the point farthest from the straight line joining the fastest and the most accurate
      points, with accuracy and log-latency scaled to [0, 1] (the "kneedle" idea of Satopaa et al.,
      "Finding a 'Kneedle' in a Haystack", ICDCS workshops 2011).
    """
    if rule not in PICK_RULES:
        raise ConfigError(f"Unknown pick rule {rule!r}. Use one of: {', '.join(PICK_RULES)}.")
    if not rows:
        raise ConfigError("The study has no feasible completed trial yet; run more trials or relax the limits.")
    best_acc = max(r.accuracy for r in rows)
    if rule == "accuracy":
        row = min(rows, key=lambda r: (-r.accuracy, r.latency_ms))
        return row, f"highest validation accuracy on the front ({row.accuracy:.4f})"
    if rule == "latency":
        row = min(rows, key=lambda r: (r.latency_ms, -r.accuracy))
        return row, f"lowest latency on the front ({row.latency_ms:.3f} ms)"
    if rule == "knee":
        return _knee(rows)
    close = [r for r in rows if r.accuracy >= best_acc - tolerance - 1e-12]
    row = min(close, key=lambda r: (r.latency_ms, r.cost_usd))
    why = (f"fastest trial within {tolerance:.0%} of the best validation accuracy ({best_acc:.4f}): "
           f"{row.accuracy:.4f} at {row.latency_ms:.3f} ms")
    most = min(rows, key=lambda r: (-r.accuracy, r.latency_ms))
    if most.number != row.number and row.latency_ms > 0:
        why += (f", {most.latency_ms / row.latency_ms:.1f}x faster than the most accurate trial "
                f"{most.number} ({most.accuracy:.4f})")
    return row, why


def _knee(rows: list[FrontRow]) -> tuple[FrontRow, str]:
    import math

    if len(rows) < 3:
        row = min(rows, key=lambda r: (-r.accuracy, r.latency_ms))
        return row, "fewer than three points on the front, so the most accurate one"
    lat = [math.log(r.latency_ms) for r in rows]
    acc = [r.accuracy for r in rows]
    lo_l, hi_l, lo_a, hi_a = min(lat), max(lat), min(acc), max(acc)
    xs = [(v - lo_l) / ((hi_l - lo_l) or 1.0) for v in lat]
    ys = [(v - lo_a) / ((hi_a - lo_a) or 1.0) for v in acc]
    # Signed distance above the line from the fastest point to the most accurate one.
    i0, i1 = xs.index(min(xs)), ys.index(max(ys))
    (x0, y0), (x1, y1) = (xs[i0], ys[i0]), (xs[i1], ys[i1])
    norm = math.hypot(x1 - x0, y1 - y0) or 1.0
    above = [((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) / norm for x, y in zip(xs, ys)]
    best = max(range(len(rows)), key=lambda i: above[i])
    row = rows[best]
    return row, (f"knee of the front: {row.accuracy:.4f} at {row.latency_ms:.3f} ms, where more accuracy "
                 "starts to cost disproportionately more latency")


def hypervolume(points: list[tuple[float, float]], *, ref_latency_ms: float, ref_accuracy: float = 0.0) -> float:
    """Area dominated by (accuracy, latency_ms) points, in accuracy x decades of latency.

    The reference point is (``ref_accuracy``, ``ref_latency_ms``); latency is measured in log10
    decades below the reference, since a 2x speed-up matters as much at 1 ms as at 10 ms. A point
    that is not better than the reference on both axes adds nothing.
    """
    import math

    pts = sorted((math.log10(ref_latency_ms / lat), acc - ref_accuracy) for acc, lat in points
                 if lat < ref_latency_ms and acc > ref_accuracy)
    area, best_acc = 0.0, 0.0
    # Sweep from the fastest (most decades) to the slowest: each point adds the strip of accuracy
    # it holds above every faster point, over the decades it reaches.
    for decades, acc in sorted(pts, key=lambda p: -p[0]):
        if acc > best_acc:
            area += (acc - best_acc) * decades
            best_acc = acc
    return area
