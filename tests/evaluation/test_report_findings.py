"""The study report's findings are written from the numbers and their intervals (synthetic
populations with known answers)."""

from __future__ import annotations

import numpy as np

from steerloop.evaluation.report.findings import findings, short_loop_finding
from steerloop.evaluation.report.rows import PREDICTORS, PolicyRow
from steerloop.evaluation.report.tables import cell_tables, correlations


def _row(i: int, rmse: float, short_departures: float, success: float, ci: tuple[float, float]) -> PolicyRow:
    offline = {key: rmse * (1 + 0.01 * k) for k, key in enumerate(PREDICTORS)}
    offline.update(frames=100, short_departure_rate=short_departures, short_final_offset_m=short_departures,
                   short_on_policy_rmse=short_departures)
    closed = {"success_rate": success, "mean_abs_offset_m": 1 - success, "departures_per_km": 1 - success,
              "on_policy_rmse": rmse * 3, "autonomy_pct": None, "recovery_rate": None}
    results = {"test": ({"aggregate": {"scenarios": 20, "success_rate_ci95": list(ci)}}, None)}
    row = PolicyRow(name=f"p{i}", family="pilotnet", arch="pilotnet", regime="clean", frames=100, val_rmse=rmse,
                    offline=offline, zeros={"rmse": 0.1}, closed=closed, results=results)
    row.cells = {"c": {"offline": offline, "closed": closed, "suite": "test", "offline_data": "val"}}
    return row


def _population(short_tracks_success: bool, separated: bool) -> list[PolicyRow]:
    rng = np.random.default_rng(0)
    success = np.linspace(0.1, 1.0, 8)
    rows = []
    for i, s in enumerate(success):
        rmse = 0.02 + 0.01 * rng.random()  # offline error unrelated to driving
        short = 1 - s if short_tracks_success else rng.random()
        ci = (s - 0.05, s + 0.05) if separated else (0.0, 1.0)
        rows.append(_row(i, rmse, short, float(s), ci))
    return rows


def test_short_loop_finding_follows_the_correlations_and_states_the_population():
    rows = _population(short_tracks_success=True, separated=True)
    corr = correlations(rows)
    offline_r = {k: corr[(k, "success_rate")]["pearson"][0] for k in ("rmse", "mae")}
    text = short_loop_finding(rows, corr, offline_r)
    assert "Across 8 policies" in text and "The short loop predicts driving better" in text
    assert corr[("short_departure_rate", "success_rate")]["pearson"][0] < -0.99
    unrelated = _population(short_tracks_success=False, separated=True)
    corr = correlations(unrelated)
    offline_r = {"rmse": -0.99}  # an offline metric stronger than any short-loop score
    assert "does not reproduce in this population" in short_loop_finding(unrelated, corr, offline_r)


def test_best_offline_not_best_on_the_road_needs_separated_intervals():
    for separated, needle in ((True, "The published finding reproduces"), (False, "so it is not established here")):
        rows = _population(short_tracks_success=True, separated=separated)
        rows[0].offline["rmse"] = 0.001  # the best offline policy drives worst
        text = " ".join(findings(rows, correlations(rows), {}, "test"))
        assert needle in text, text


def test_per_cell_tables_have_one_correlation_table_per_cell():
    rows = _population(short_tracks_success=True, separated=True)
    text = "\n".join(cell_tables(rows, {"c": {"offline_data": "val"}}))
    assert "**Cell `c`**: offline on `val`, closed loop on `test` (8 policies)." in text
    assert "| short_departure_rate | r -1.00" in text
