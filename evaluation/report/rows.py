"""The rows of the report: one per policy, collected from the stages' saved outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from steerloop.evaluation.copycat import closed_loop_probe  # noqa: E402
from steerloop.evaluation.regress import load_results  # noqa: E402


OFFLINE_METRICS = ("rmse", "mae", "balanced_mae", "change_point_rmse", "speed_weighted_mae",
                   "cumulative_speed_weighted_error", "qce", "tre")
SHORT_LOOP_METRICS = ("short_final_offset_m", "short_departure_rate", "short_on_policy_rmse")  # from logged states
PREDICTORS = OFFLINE_METRICS + SHORT_LOOP_METRICS  # the cheap measurements set against the closed loop
CLOSED_LOOP_METRICS = ("success_rate", "mean_abs_offset_m", "departures_per_km", "autonomy_pct", "recovery_rate",
                       "on_policy_rmse")
RECURRENT = ("cnn-lstm", "conv3d-lstm", "komanda", "chauffeur")
SMOOTHING_S = 1.0  # [s] moving-average window of the compounding-error curves
AFTER_PERTURBATION_S = 8.0  # [s] window plotted after a perturbation starts
CODEVILLA_MSE_R = 0.39  # Codevilla et al. 2018: MSE vs success rate
CODEVILLA_OTHER_R = 0.6  # ... MAE, QCE and TRE reach r > 0.6
SIMILAR_RMSE = 0.1  # offline RMSEs within 10% of each other count as "equal offline error"
MATCHED_FRAMES = 0.9  # a behaviour-cloning control needs at least this fraction of DAgger's labelled frames
VIDEO_STEM_MAX = 200  # [bytes] of a video's name before ".mp4" (names of scenario and policies; hashed beyond)


@dataclass


class PolicyRow:
    """Everything the report knows about one policy of the population."""

    name: str
    family: str
    arch: str
    regime: str
    frames: int | None  # expert-labelled training frames (None for a user's policy: not known)
    val_rmse: float | None
    offline: dict
    zeros: dict
    recurrent: bool = False
    closed: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # suite name -> (results.json dict, results directory)
    history: dict = field(default_factory=dict)  # inputs, fed-back outputs, training mode, window, copycat measures
    cells: dict = field(default_factory=dict)  # cell name -> {"offline": predictors, "closed": closed-loop metrics}
    run: str = ""  # the training run the policy comes from (its own name, or RUN for RUN's checkpoint RUN-eNN)
    epoch: int | None = None  # a checkpoint along RUN's training: the epoch after which it was kept



# ----------------------------------------------------------------------------- collection
def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _frames(dirs: list[str]) -> int:
    return sum(int(e["length"]) for d in dirs for e in _read_json(Path(d) / "manifest.json")["episodes"].values())


def _regime(plan, name: str) -> str:
    stage = plan.policies[name]
    if stage.kind == "user":
        return "user"
    if stage.kind == "dagger":
        return "dagger"
    config = stage.params["config"]
    noisy = any(plan.config.datasets[d].get("noise", 0.0) > 0 for d in config["data"])
    augment = set(config.get("augment", ("shift", "jitter")))
    if noisy:
        return "dart-noise"
    if config.get("camera") == "all" and "side" in augment:
        return "side-cameras"
    if "shift" in augment:
        return "shift-augment"
    return "clean"


def predictors(offline: dict, entry: str = "model") -> dict:
    """The offline metrics of one ``offline.json`` entry (model or zeros), with the RMSE at
    the expert's change-points and, for the model, the short closed-loop scores."""
    out = dict(offline[entry])
    out["change_point_rmse"] = offline.get("events", {}).get(entry, {}).get("change_point_rmse")
    short = offline.get("short_loop") if entry == "model" else None
    for key, source in zip(SHORT_LOOP_METRICS, ("final_abs_offset_m", "departure_rate", "on_policy_rmse")):
        out[key] = short.get(source) if short else None
    return out


def closed_metrics(results: dict, suites: list) -> dict:
    """The closed-loop columns from the primary suite's aggregate (``results`` maps suite name to
    (results, dir); ``suites``: primary first); autonomy and recovery from the suites that have them."""
    agg = results[suites[0].name][0]["aggregate"]
    closed = {key: agg.get(key) for key in ("success_rate", "mean_abs_offset_m", "departures_per_km",
                                           "on_policy_rmse")}
    closed["autonomy_pct"] = next((results[s.name][0]["aggregate"]["autonomy_pct"]
                                   for s in suites if s.has_interventions), None)
    closed["recovery_rate"] = next((results[s.name][0]["aggregate"]["recovery_rate"]
                                    for s in suites if s.has_perturbations), None)
    return closed


def _cells(plan, name: str, results: dict) -> dict:
    """Per cell of the study: the policy's predictors on the cell's logs and its closed loop on the cell's suite."""
    out = {}
    for cell, spec in plan.config.cells.items():
        suite = next(s for path, s in zip(plan.config.suites, plan.suites.values()) if path == spec["suite"])
        offline = _read_json(plan.offline_stage(name, spec["offline_data"]).out / "offline.json")
        out[cell] = {"offline": predictors(offline), "zeros": predictors(offline, "zeros"),
                     "closed": closed_metrics(results, [suite]), "suite": suite.name,
                     "offline_data": spec["offline_data"]}
    return out


def missing_checkpoints(plan) -> list[str]:
    """Why each checkpoint policy without a checkpoint (early stopping) has no row."""
    return [reason for name in plan.policies if (reason := plan.missing_checkpoint(name))]


def collect(plan) -> list[PolicyRow]:
    """One row per policy from the stages' outputs (none for a checkpoint early stopping never wrote)."""
    suites = list(plan.suites.values())
    primary = suites[0]
    rows = []
    for name, stage in plan.policies.items():
        if plan.missing_checkpoint(name):
            continue
        offline = _read_json(plan.offline[name].out / "offline.json")
        results = {suite.name: (load_results(plan.closed_loop[(name, suite.name)].out).data,
                                plan.closed_loop[(name, suite.name)].out) for suite in suites}
        if stage.kind == "user":  # what the policy says about itself (its describe() in results.json)
            described = results[primary.name][0]["policy"]
            arch, recurrent = str(described.get("arch", "user")), bool(described.get("recurrent", False))
            frames, val_rmse = None, None
            meta = {"model": {"arch": arch, "inputs": list(described.get("inputs", ["image"])),
                              "fed_back": bool(described.get("fed_back"))}}
        else:
            meta = _read_json(Path(plan.checkpoint(name)) / "config.json")
            arch, frames = meta["model"]["arch"], _frames(plan.dataset_dirs(name))
            recurrent, val_rmse = arch in RECURRENT, meta.get("metrics", {}).get("val_rmse")
        row = PolicyRow(name=name, family=plan.config.policies[name].family, arch=arch, regime=_regime(plan, name),
                        frames=frames, val_rmse=val_rmse, offline=predictors(offline),
                        zeros=predictors(offline, "zeros"), recurrent=recurrent, results=results)
        row.closed = closed_metrics(results, suites)
        row.cells = _cells(plan, name, results)
        row.history = history_of(meta, offline, row.results[primary.name][1])
        if stage.kind == "checkpoint":  # one run's checkpoints are not a history-length sweep of it
            row.run, row.epoch = stage.params["run"], stage.params["epoch"]
            row.history["recipe"] = {**row.history["recipe"], "checkpoint_epoch": row.epoch}
        else:
            row.run = name
        rows.append(row)
    return rows


def history_of(meta: dict, offline: dict, primary_dir: Path) -> dict:
    """What the History and copycat section needs of one policy: its inputs and fed-back
    outputs, how they were trained, its window, the offline baselines and event split, and
    the copycat probe on the expert's logs and on its own closed-loop steering."""
    model, training = meta["model"], meta.get("training", {})
    inputs = list(model.get("inputs", ["image"]))
    fed_back = bool(model.get("fed_back")) or model["arch"] == "komanda" or "prev_steering" in inputs
    return {"inputs": inputs, "fed_back": fed_back, "mode": training.get("feedback_mode", "teacher"),
            "seq_len": training.get("seq_len"), "recipe": {k: v for k, v in training.items()
                                                           if k not in ("seq_len", "out", "init", "threads",
                                                                        "keep_epochs")},
            "teacher_forced": offline.get("teacher_forced"), "repeat_previous": offline.get("repeat_previous"),
            "events": offline.get("events", {}), "expert_probe": offline.get("copycat_probe", {}).get("expert"),
            "probe": closed_loop_probe(primary_dir)}
