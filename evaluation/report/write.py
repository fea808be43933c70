"""``write_report``: ``OUT/report.md`` and its figures."""

from __future__ import annotations

import json
from pathlib import Path

from steerloop.evaluation.report.figures import _scatter, compounding_figure, contrast_figure, contrast_video, on_policy_figure, pick_contrast  # noqa: E402
from steerloop.evaluation.report.findings import dagger_comparisons, dagger_table, findings  # noqa: E402
from steerloop.evaluation.report.history import history_baselines, history_findings, history_table, sweep_groups, sweep_table  # noqa: E402
from steerloop.evaluation.report.rows import VIDEO_STEM_MAX, collect, missing_checkpoints  # noqa: E402
from steerloop.evaluation.report.tables import _fmt, cell_tables, closed_loop_order, correlation_table, correlations, offline_table, policy_table, short_loop_table  # noqa: E402
from steerloop.evaluation.stats import BOOTSTRAP_RESAMPLES  # noqa: E402
from steerloop.files import json_safe  # noqa: E402
from steerloop.paths import path_under, shorten  # noqa: E402


# ----------------------------------------------------------------------------- report
def _short_loop_section(plan, rows) -> list[str]:
    short = plan.config.short_loop
    if not short.get("rollouts") or rows[0].offline.get("short_final_offset_m") is None:
        return []
    return ["## Short closed loop from logged states", "",
            f"Each policy drives {short['horizon']:g} s from the same {short['rollouts']} states sampled (seed "
            f"{short['seed']}) from `{plan.config.offline_data}`, after a {short['warmup']:g} s warm-up on the logged "
            "frames before each state; scored by |offset| at the end, departures within the horizon and the "
            "steering error on the states it visited (docs/metrics.md).", "", short_loop_table(rows), ""]


def checkpoint_note(rows, missing: list[str]) -> list[str]:
    """Report lines on checkpoints along training: how many runs the population comes from,
    and which listed checkpoints early stopping never wrote (none: no lines)."""
    runs = {r.run for r in rows}
    if len(runs) == len(rows) and not missing:
        return []
    lines = [f"The {len(rows)} policies come from {len(runs)} training runs: a checkpoint along a run is "
             "`RUN-eNN` (the `run` column; in the scatter plots a dashed line joins one run's checkpoints, in epoch "
             "order, to its best checkpoint).", ""]
    if missing:
        lines += ["Not evaluated (early stopping ended the run before the listed epoch):", "",
                  *[f"- {reason}" for reason in missing], ""]
    return lines


def write_report(plan) -> Path:
    """Write ``OUT/report.md`` and its figures; returns the report path."""
    rows = collect(plan)
    primary = list(plan.suites)[0]
    figures = path_under(plan.out, "figures")
    figures.mkdir(parents=True, exist_ok=True)
    corr = correlations(rows)
    _scatter(rows, "success_rate", f"success rate ({primary})", figures / "rmse_vs_success.png")
    has_autonomy = any(r.closed["autonomy_pct"] is not None for r in rows)
    if has_autonomy:
        _scatter(rows, "autonomy_pct", "autonomy %", figures / "rmse_vs_autonomy.png")
    compounding = compounding_figure(rows, plan, figures / "compounding.png")
    on_policy_figure(rows, figures / "on_policy_vs_offline.png")
    contrast = pick_contrast(rows, primary)
    dagger = dagger_comparisons(rows, plan)
    order = closed_loop_order(rows)
    best_offline = min(rows, key=lambda r: r.offline["rmse"])

    md = [f"# Offline vs closed loop: study `{plan.config.name}`", "",
          f"{len(rows)} policies; offline metrics on the held-out dataset `{plan.config.offline_data}` "
          f"({rows[0].offline['frames']} frames); closed loop on "
          + ", ".join(f"`{name}` ({len(s.scenarios)} scenarios)" for name, s in plan.suites.items())
          + f". Success, mean |offset|, departures/km and on-policy RMSE are from `{primary}`.", "",
          *checkpoint_note(rows, missing_checkpoints(plan)),
          "## Findings", "", *[f"- {line}" for line in findings(rows, corr, compounding, primary, dagger)], "",
          "## Policies: offline beside closed loop", "", policy_table(rows), "",
          "Offline metrics on held-out logs, with the all-zeros predictor (`balanced_mae`: the MAE averaged over "
          "bins of the expert's steering magnitude; `change_point_rmse`: the RMSE where the expert's command "
          "changes fast; docs/metrics.md):", "", offline_table(rows), "",
          *_short_loop_section(plan, rows),
          "## Correlation across the population (Codevilla et al. style)", "",
          f"Pearson r, Spearman ρ and Kendall τ with 95% bootstrap intervals over policies ({BOOTSTRAP_RESAMPLES} "
          "resamples), and how many policy pairs the two metrics order the opposite way (inverted k/N). "
          "Lower is better for every offline metric; for success, autonomy and recovery a useful offline metric "
          "correlates negatively.", "",
          correlation_table(corr) if corr else "Correlations need at least 3 policies with the metric.", "",
          "## Where the best offline policy ranks", "",
          f"Lowest offline RMSE: **{best_offline.name}** ({best_offline.offline['rmse']:.4f}), closed-loop rank "
          f"**{order.index(best_offline) + 1} of {len(rows)}**.", "",
          "| closed-loop rank | policy | success | offline RMSE | offline rank |", "|---|---|---|---|---|"]
    offline_rank = sorted(rows, key=lambda r: r.offline["rmse"])
    for i, r in enumerate(order, 1):
        md.append(f"| {i} | {r.name} | {_fmt(r.closed['success_rate'], 2)} | {r.offline['rmse']:.4f} | "
                  f"{offline_rank.index(r) + 1} |")
    md += ["", "![offline RMSE vs success](figures/rmse_vs_success.png)"]
    if has_autonomy:
        md += ["![offline RMSE vs autonomy](figures/rmse_vs_autonomy.png)"]
    if plan.config.cells:
        md += ["", "## Per cell (training vs new tracks and conditions; Codevilla et al.)", "",
               "Each cell pairs held-out logs with the closed-loop suite of the same tracks and conditions; every "
               "correlation below is computed within one cell.", "", *cell_tables(rows, plan.config.cells)]
    if dagger:
        md += ["", "## DAgger against behaviour cloning", "",
               "Closed loop on the primary suite; expert-labelled frames count every dataset the policy was trained "
               "on (for DAgger: the initial data and every iteration's).", "", dagger_table(dagger)]
    md += ["", "## History and copycat", "",
           "A policy that sees its previous command can predict the next one well offline by repeating it (the "
           "copycat problem: de Haan et al. 2019, Wen et al. 2020). Offline errors here are beside the "
           "repeat-previous baseline, split at the expert's steering change-points, and for fed-back models given "
           "both with the logged commands in the loop (teacher forced) and with their own (free running); closed "
           f"loop from `{primary}` (recovery from the perturbation suite); the probe regresses each command on the "
           "previous ones (docs/models.md).", "", history_baselines(rows), "", history_table(rows), "",
           *[f"- {line}" for line in history_findings(rows)]]
    sweeps = sweep_groups(rows)
    if sweeps or any(r.arch == "chauffeur" for r in rows):
        md += ["", "### History length", "", sweep_table(sweeps, rows)]
    md += ["", "## Compounding error", "",
           "Mean |lateral offset| against time since the start, steering error in closed loop beside the open-loop "
           "replay of the held-out logs, and |offset| after a scripted perturbation, per policy family.", "",
           "![compounding error](figures/compounding.png)", "",
           "## On-policy vs offline RMSE", "",
           "How much worse each policy predicts the expert on the states it visits itself.", "",
           "![on-policy vs offline RMSE](figures/on_policy_vs_offline.png)", ""]
    md += ["## A failing and a succeeding policy on the same track", ""]
    if contrast:
        index, fail, ok = contrast
        scenario = plan.suites[primary].scenarios[index].name
        contrast_figure(plan, primary, index, fail, ok, figures / "contrast.png")
        stem = shorten(f"{scenario}-{fail.name}-vs-{ok.name}", VIDEO_STEM_MAX)
        video = path_under(plan.out, "videos", f"{stem}.mp4")
        video.parent.mkdir(parents=True, exist_ok=True)
        contrast_video(plan, primary, index, fail, ok, video)
        md += [f"On `{scenario}`, **{fail.name}** departs and **{ok.name}** succeeds.", "",
               "![failing vs succeeding](figures/contrast.png)", "",
               f"Video (failing on the left): [{video.relative_to(plan.out)}]({video.relative_to(plan.out)})", ""]
    else:
        md += ["No track of the primary suite has both a failing and a succeeding policy.", ""]
    md += ["## Reproduce", "", f"`steerloop study --config {plan.config.path} --out {plan.out}` (cached: re-running "
           "does nothing; changing a policy re-runs only its stages).", ""]
    path = path_under(plan.out, "report.md")
    path.write_text("\n".join(md))
    summary = {"policies": [{"name": r.name, "run": r.run, "epoch": r.epoch, "family": r.family, "regime": r.regime,
                             "frames": r.frames,
                             "val_rmse": r.val_rmse, "offline": r.offline, "zeros": r.zeros, "closed_loop": r.closed,
                             "history": {k: v for k, v in r.history.items() if k != "recipe"}, "cells": r.cells}
                            for r in rows],
               "correlations": [{"offline": k[0], "closed_loop": k[1], **v} for k, v in corr.items()],
               "best_offline": best_offline.name, "best_offline_closed_loop_rank": order.index(best_offline) + 1,
               "missing_checkpoints": missing_checkpoints(plan)}
    path_under(plan.out, "report.json").write_text(json.dumps(json_safe(summary), indent=1, sort_keys=True))
    return path
