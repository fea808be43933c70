"""The report's markdown tables and its correlation table."""

from __future__ import annotations

import math

import numpy as np  # noqa: E402

from steerloop.evaluation.report.rows import CLOSED_LOOP_METRICS, OFFLINE_METRICS, PREDICTORS, SHORT_LOOP_METRICS, PolicyRow  # noqa: E402
from steerloop.evaluation.stats import correlation_ci, kendall, pearson, ranking_inversions, spearman  # noqa: E402


# ----------------------------------------------------------------------------- tables
def _fmt(value, digits: int = 3, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def policy_table(rows: list[PolicyRow]) -> str:
    """One line per policy; with checkpoints along training, a ``run`` column names the
    training run each policy comes from (``RUN @ epoch N`` for a checkpoint)."""
    runs = any(r.epoch is not None for r in rows)
    head = ("| policy |" + (" run |" if runs else "") + " family | data | frames | offline RMSE | zeros RMSE | "
            "offline MAE | QCE | TRE | success | mean abs offset [m] | departures/km | autonomy % | recovery | "
            "on-policy RMSE | on-policy / offline |")
    lines = [head, "|" + "|".join(["---"] * (17 if runs else 16)) + "|"]
    for r in rows:
        ratio = r.closed["on_policy_rmse"] / r.offline["rmse"] if r.offline["rmse"] else math.nan
        run = (f" {r.run} @ epoch {r.epoch} |" if r.epoch is not None else f" {r.run} |") if runs else ""
        lines.append(f"| {r.name} |{run} {r.family} | {r.regime} | {_fmt(r.frames, 0)} | "
                     f"{_fmt(r.offline['rmse'], 4)} | "
                     f"{_fmt(r.zeros['rmse'], 4)} | {_fmt(r.offline['mae'], 4)} | {_fmt(r.offline['qce'])} | "
                     f"{_fmt(r.offline['tre'])} | {_fmt(r.closed['success_rate'], 2)} | "
                     f"{_fmt(r.closed['mean_abs_offset_m'])} | {_fmt(r.closed['departures_per_km'], 2)} | "
                     f"{_fmt(r.closed['autonomy_pct'], 1)} | {_fmt(r.closed['recovery_rate'], 2)} | "
                     f"{_fmt(r.closed['on_policy_rmse'], 4)} | {_fmt(ratio, 1)}x |")
    return "\n".join(lines)


def offline_table(rows: list[PolicyRow]) -> str:
    lines = ["| policy | " + " | ".join(OFFLINE_METRICS) + " |", "|" + "|".join(["---"] * (len(OFFLINE_METRICS) + 1))
             + "|"]
    for r in rows:
        lines.append(f"| {r.name} | " + " | ".join(_fmt(r.offline.get(k), 4) for k in OFFLINE_METRICS) + " |")
    zeros = rows[0].zeros
    lines.append("| *all-zeros* | " + " | ".join(_fmt(zeros.get(k), 4) for k in OFFLINE_METRICS) + " |")
    return "\n".join(lines)


def short_loop_table(rows: list[PolicyRow]) -> str:
    """The short closed-loop scores beside offline RMSE and the full closed loop's success."""
    lines = ["| policy | offline RMSE | short: abs offset at the end [m] | short: departure rate | short: on-policy RMSE "
             "| closed loop: success |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {_fmt(r.offline['rmse'], 4)} | {_fmt(r.offline['short_final_offset_m'])} | "
                     f"{_fmt(r.offline['short_departure_rate'], 2)} | {_fmt(r.offline['short_on_policy_rmse'], 4)} | "
                     f"{_fmt(r.closed['success_rate'], 2)} |")
    return "\n".join(lines)


HIGHER_IS_BETTER_CLOSED = ("success_rate", "autonomy_pct", "recovery_rate")  # the rest: lower is better


def correlations(rows: list[PolicyRow], cell: str | None = None) -> dict:
    """{(predictor, closed metric): {pearson, spearman, kendall: (value, lo, hi), inversions,
    pairs, n}}: ``inversions`` of the ``pairs`` policy pairs are ordered one way by the
    predictor (an offline or short-loop metric; lower is better) and the other way by the
    closed-loop metric. ``cell``: the values of that cell of the study (else the primary ones)."""
    out = {}
    for off in PREDICTORS:
        for closed in CLOSED_LOOP_METRICS:
            values = [(r.cells[cell]["offline"], r.cells[cell]["closed"]) if cell else (r.offline, r.closed)
                      for r in rows]
            pairs = [(o[off], c[closed]) for o, c in values if o.get(off) is not None and c.get(closed) is not None]
            if len(pairs) < 3:
                continue
            x, y = np.asarray(pairs, np.float64).T
            out[(off, closed)] = {
                "pearson": correlation_ci(x, y, pearson), "spearman": correlation_ci(x, y, spearman),
                "kendall": correlation_ci(x, y, kendall), "n": len(pairs), "pairs": len(pairs) * (len(pairs) - 1) // 2,
                "inversions": ranking_inversions(x, y, y_higher_is_better=closed in HIGHER_IS_BETTER_CLOSED)}
    return out


def correlation_table(corr: dict) -> str:
    closed = [c for c in CLOSED_LOOP_METRICS if any(k[1] == c for k in corr)]
    lines = ["| offline / short-loop metric | " + " | ".join(closed) + " |", "|" + "|".join(["---"] * (len(closed) + 1)) + "|"]

    def cell(v):
        r, lo, hi = v
        return "n/a (constant)" if math.isnan(r) else f"{r:+.2f} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]"

    for off in [p for p in PREDICTORS if any(k[0] == p for k in corr)]:
        cells = []
        for c in closed:
            entry = corr.get((off, c))
            cells.append("" if entry is None else f"r {cell(entry['pearson'])}<br>ρ {cell(entry['spearman'])}<br>"
                         f"τ {cell(entry['kendall'])}<br>inverted {entry['inversions']}/{entry['pairs']}")
        lines.append(f"| {off} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell_tables(rows: list[PolicyRow], cells: dict) -> list[str]:
    """Per cell: each policy's predictors and closed loop, then the correlations of every
    predictor with success in that cell (markdown lines)."""
    out = ["| policy | " + " | ".join(f"{c}: offline RMSE | {c}: short departure rate | {c}: success"
                                      for c in cells) + " |",
           "|" + "|".join(["---"] * (1 + 3 * len(cells))) + "|"]
    for r in rows:
        out.append(f"| {r.name} | " + " | ".join(
            f"{_fmt(r.cells[c]['offline']['rmse'], 4)} | {_fmt(r.cells[c]['offline']['short_departure_rate'], 2)} | "
            f"{_fmt(r.cells[c]['closed']['success_rate'], 2)}" for c in cells) + " |")
    for cell, spec in cells.items():
        corr = {k: v for k, v in correlations(rows, cell).items() if k[1] in ("success_rate", "mean_abs_offset_m")}
        suite = rows[0].cells[cell]["suite"]
        out += ["", f"**Cell `{cell}`**: offline on `{spec['offline_data']}`, closed loop on `{suite}` "
                f"({len(rows)} policies).", "",
                correlation_table(corr) if corr else "Correlations need at least 3 policies with the metric."]
    return out


def closed_loop_order(rows: list[PolicyRow]) -> list[PolicyRow]:
    """Best driver first: success rate, then fewer departures per km, then mean |offset|."""
    return sorted(rows, key=lambda r: (-(r.closed["success_rate"] or 0.0), r.closed["departures_per_km"] or 0.0,
                                       r.closed["mean_abs_offset_m"] or 0.0, r.name))
