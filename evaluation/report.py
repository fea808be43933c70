"""The gap study's report: ``OUT/report.md`` with PNG figures in ``OUT/figures``.

Everything is computed from the stages' saved outputs (offline JSON, open-loop replays,
closed-loop results and trajectories); the only simulator run is the side-by-side video
of a failing and a succeeding policy. The findings section is generated from the
numbers, and says plainly when a published finding does not reproduce.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from steerloop.evaluation.copycat import closed_loop_probe  # noqa: E402
from steerloop.evaluation.regress import load_results  # noqa: E402
from steerloop.evaluation.runner import run_scenario  # noqa: E402
from steerloop.evaluation.stats import BOOTSTRAP_RESAMPLES, correlation_ci, pearson, spearman  # noqa: E402
from steerloop.training.copycat import probe_ratio  # noqa: E402
from steerloop.evaluation.suites import CONTROL_DT  # noqa: E402
from steerloop.files import json_safe  # noqa: E402
from steerloop.paths import path_under, shorten  # noqa: E402
from steerloop.sim.env import load_track  # noqa: E402

OFFLINE_METRICS = ("rmse", "mae", "speed_weighted_mae", "cumulative_speed_weighted_error", "qce", "tre")
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


def collect(plan) -> list[PolicyRow]:
    """One row per policy from the stages' outputs."""
    suites = list(plan.suites.values())
    primary = suites[0]
    rows = []
    for name, stage in plan.policies.items():
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
                        frames=frames, val_rmse=val_rmse, offline=offline["model"], zeros=offline["zeros"],
                        recurrent=recurrent, results=results)
        agg = row.results[primary.name][0]["aggregate"]
        row.closed = {key: agg.get(key) for key in ("success_rate", "mean_abs_offset_m", "departures_per_km",
                                                     "on_policy_rmse")}
        row.closed["autonomy_pct"] = next((row.results[s.name][0]["aggregate"]["autonomy_pct"]
                                           for s in suites if s.has_interventions), None)
        row.closed["recovery_rate"] = next((row.results[s.name][0]["aggregate"]["recovery_rate"]
                                            for s in suites if s.has_perturbations), None)
        row.history = history_of(meta, offline, row.results[primary.name][1])
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
                                                           if k not in ("seq_len", "out", "init", "threads")},
            "teacher_forced": offline.get("teacher_forced"), "repeat_previous": offline.get("repeat_previous"),
            "events": offline.get("events", {}), "expert_probe": offline.get("copycat_probe", {}).get("expert"),
            "probe": closed_loop_probe(primary_dir)}


# ----------------------------------------------------------------------------- tables
def _fmt(value, digits: int = 3, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def policy_table(rows: list[PolicyRow]) -> str:
    head = ("| policy | family | data | frames | offline RMSE | zeros RMSE | offline MAE | QCE | TRE | success | "
            "mean abs offset [m] | departures/km | autonomy % | recovery | on-policy RMSE | on-policy / offline |")
    lines = [head, "|" + "|".join(["---"] * 16) + "|"]
    for r in rows:
        ratio = r.closed["on_policy_rmse"] / r.offline["rmse"] if r.offline["rmse"] else math.nan
        lines.append(f"| {r.name} | {r.family} | {r.regime} | {_fmt(r.frames, 0)} | {_fmt(r.offline['rmse'], 4)} | "
                     f"{_fmt(r.zeros['rmse'], 4)} | {_fmt(r.offline['mae'], 4)} | {_fmt(r.offline['qce'])} | "
                     f"{_fmt(r.offline['tre'])} | {_fmt(r.closed['success_rate'], 2)} | "
                     f"{_fmt(r.closed['mean_abs_offset_m'])} | {_fmt(r.closed['departures_per_km'], 2)} | "
                     f"{_fmt(r.closed['autonomy_pct'], 1)} | {_fmt(r.closed['recovery_rate'], 2)} | "
                     f"{_fmt(r.closed['on_policy_rmse'], 4)} | {_fmt(ratio, 1)}x |")
    return "\n".join(lines)


def offline_table(rows: list[PolicyRow]) -> str:
    lines = ["| policy | " + " | ".join(OFFLINE_METRICS) + " |", "|" + "|".join(["---"] * 7) + "|"]
    for r in rows:
        lines.append(f"| {r.name} | " + " | ".join(_fmt(r.offline[k], 4) for k in OFFLINE_METRICS) + " |")
    zeros = rows[0].zeros
    lines.append("| *all-zeros* | " + " | ".join(_fmt(zeros[k], 4) for k in OFFLINE_METRICS) + " |")
    return "\n".join(lines)


def correlations(rows: list[PolicyRow]) -> dict:
    """{(offline metric, closed metric): {pearson: (r, lo, hi), spearman: (...), n}}."""
    out = {}
    for off in OFFLINE_METRICS:
        for closed in CLOSED_LOOP_METRICS:
            pairs = [(r.offline[off], r.closed[closed]) for r in rows
                     if r.offline.get(off) is not None and r.closed.get(closed) is not None]
            if len(pairs) < 3:
                continue
            x, y = np.asarray(pairs, np.float64).T
            out[(off, closed)] = {"pearson": correlation_ci(x, y, pearson), "spearman": correlation_ci(x, y, spearman),
                                  "n": len(pairs)}
    return out


def correlation_table(corr: dict) -> str:
    closed = [c for c in CLOSED_LOOP_METRICS if any(k[1] == c for k in corr)]
    lines = ["| offline metric | " + " | ".join(closed) + " |", "|" + "|".join(["---"] * (len(closed) + 1)) + "|"]

    def cell(v):
        r, lo, hi = v
        return "n/a (constant)" if math.isnan(r) else f"{r:+.2f} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]"

    for off in OFFLINE_METRICS:
        cells = []
        for c in closed:
            entry = corr.get((off, c))
            cells.append("" if entry is None else f"r {cell(entry['pearson'])}<br>ρ {cell(entry['spearman'])}")
        lines.append(f"| {off} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def closed_loop_order(rows: list[PolicyRow]) -> list[PolicyRow]:
    """Best driver first: success rate, then fewer departures per km, then mean |offset|."""
    return sorted(rows, key=lambda r: (-(r.closed["success_rate"] or 0.0), r.closed["departures_per_km"] or 0.0,
                                       r.closed["mean_abs_offset_m"] or 0.0, r.name))


# ----------------------------------------------------------------------------- figures
def _scatter(rows, y_key: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    families = sorted({r.family for r in rows})
    for i, family in enumerate(families):
        pts = [(r.offline["rmse"], r.closed[y_key], r.name) for r in rows if r.family == family
               and r.closed.get(y_key) is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=family, color=f"C{i}")
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axvline(rows[0].zeros["rmse"] / 2, color="grey", ls=":", lw=0.8, label="half all-zeros RMSE")
    ax.set_xlabel("offline RMSE on held-out logs")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _padded_mean(series: list[np.ndarray]) -> np.ndarray:
    """Mean over runs per step; a run that ended early (departure) holds its last value."""
    length = max(len(s) for s in series)
    padded = np.stack([np.concatenate([s, np.full(length - len(s), s[-1])]) for s in series])
    return padded.mean(axis=0)


def _smooth(x: np.ndarray) -> np.ndarray:
    k = max(int(SMOOTHING_S / CONTROL_DT), 1)
    if len(x) < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def _trajectories(results_dir: Path, results: dict) -> list[dict]:
    return [dict(np.load(results_dir / "trajectories" / f"{s['name']}.npz")) for s in results["scenarios"]]


def compounding_figure(rows: list[PolicyRow], plan, path: Path) -> dict:
    """Per family: |offset| vs time (closed loop), |steering error| vs time closed loop beside
    open-loop replay, and |offset| after perturbations. Returns the plotted curves' summary."""
    primary = list(plan.suites)[0]
    recovery = next((s.name for s in plan.suites.values() if s.has_perturbations), None)
    fig, axes = plt.subplots(1, 3 if recovery else 2, figsize=(15 if recovery else 10, 4))
    summary = {}
    for i, family in enumerate(sorted({r.family for r in rows})):
        members = [r for r in rows if r.family == family]
        offsets, closed_err, open_err, after = [], [], [], []
        for r in members:
            results, out = r.results[primary]
            for traj in _trajectories(out, results):
                offsets.append(np.abs(traj["lateral_offset"]))
                closed_err.append(np.abs(traj["steering"] - traj["expert_steering"]))
            replay = np.load(plan.offline[r.name].out / "replay.npz")
            for key in replay.files:
                if key.startswith("prediction_"):
                    index = key.split("_", 1)[1]
                    open_err.append(np.abs(replay[key] - replay[f"label_{index}"]))
            if recovery:
                results, out = r.results[recovery]
                window = int(AFTER_PERTURBATION_S / CONTROL_DT)
                for traj in _trajectories(out, results):
                    phase = np.asarray(traj["perturbation_phase"])
                    starts = np.flatnonzero((phase[1:] == 1) & (phase[:-1] != 1)) + 1
                    for s in starts:
                        chunk = np.abs(traj["lateral_offset"][s:s + window])
                        if len(chunk):
                            after.append(chunk)
        colour = f"C{i}"
        mean_offset = _padded_mean(offsets)
        t = np.arange(len(mean_offset)) * CONTROL_DT
        axes[0].plot(t, mean_offset, color=colour, label=family)
        closed_curve, open_curve = _smooth(_padded_mean(closed_err)), _smooth(_padded_mean(open_err))
        axes[1].plot(np.arange(len(closed_curve)) * CONTROL_DT, closed_curve, color=colour, label=f"{family} closed loop")
        axes[1].plot(np.arange(len(open_curve)) * CONTROL_DT, open_curve, color=colour, ls="--",
                     label=f"{family} open-loop replay")
        summary[family] = {"closed_steer_err": float(np.mean(np.concatenate(closed_err))),
                           "open_steer_err": float(np.mean(np.concatenate(open_err))),
                           "offset_first_10s": float(mean_offset[: int(10 / CONTROL_DT)].mean()),
                           "offset_last_10s": float(mean_offset[-int(10 / CONTROL_DT):].mean())}
        if recovery and after:
            curve = _padded_mean(after)
            axes[2].plot(np.arange(len(curve)) * CONTROL_DT, curve, color=colour, label=family)
    axes[0].set(xlabel="time since start [s]", ylabel="mean |lateral offset| [m]",
                title=f"closed loop, {primary}\n(a departed run holds its last value)")
    axes[1].set(xlabel="time since start [s]", ylabel="mean |steering - expert| (1 s average)",
                title="steering error\nclosed loop (solid) vs open-loop replay (dashed)")
    if recovery:
        axes[2].set(xlabel="time since perturbation start [s]", ylabel="mean |lateral offset| [m]",
                    title=f"after a perturbation\n{recovery}")
    for ax in axes:
        ax.legend(fontsize=6)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return summary


def on_policy_figure(rows: list[PolicyRow], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r.offline["rmse"] for r in rows], 0.4, label="offline RMSE (expert's states)")
    ax.bar(x + 0.2, [r.closed["on_policy_rmse"] or 0.0 for r in rows], 0.4, label="on-policy RMSE (own states)")
    ax.set_xticks(x, [r.name for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("steering RMSE vs expert")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pick_contrast(rows: list[PolicyRow], primary: str):
    """(scenario index, failing row, succeeding row): on one track of the primary suite, the
    failing policy with the lowest offline RMSE and the succeeding policy with the lowest."""
    best = None
    n = len(rows[0].results[primary][0]["scenarios"])
    for i in range(n):
        fails = [r for r in rows if not r.results[primary][0]["scenarios"][i]["metrics"]["success"]]
        passes = [r for r in rows if r.results[primary][0]["scenarios"][i]["metrics"]["success"]]
        if fails and passes:
            fail = min(fails, key=lambda r: r.offline["rmse"])
            ok = min(passes, key=lambda r: r.offline["rmse"])
            if best is None or fail.offline["rmse"] < best[1].offline["rmse"]:
                best = (i, fail, ok)
    return best


def contrast_figure(plan, primary: str, index: int, fail: PolicyRow, ok: PolicyRow, path: Path) -> None:
    scenario = plan.suites[primary].scenarios[index]
    track = load_track(scenario.track, length=scenario.track_length)
    fig, (top, side) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.5]})
    s = np.linspace(0, track.length, 600)
    for offset in (-track.lane_width / 2, track.lane_width / 2):
        top.plot(*track.lateral_points(s, offset), "k-", lw=0.6)
    for row, colour, verdict in ((fail, "tab:red", "departs"), (ok, "tab:green", "succeeds")):
        results, out = row.results[primary]
        traj = dict(np.load(out / "trajectories" / f"{scenario.name}.npz"))
        label = f"{row.name} ({verdict}, offline RMSE {row.offline['rmse']:.4f})"
        top.plot(traj["x"], traj["y"], color=colour, lw=1.2, label=label)
        side.plot(traj["time"], traj["lateral_offset"], color=colour, lw=1.0, label=label)
    for sign in (-1, 1):
        side.axhline(sign * 1.0, color="r", lw=0.6, ls=":")
    top.set_aspect("equal")
    top.legend(fontsize=7, loc="best")
    side.set(xlabel="time [s]", ylabel="lateral offset [m] (+ left)")
    fig.suptitle(scenario.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def contrast_video(plan, primary: str, index: int, fail: PolicyRow, ok: PolicyRow, path: Path) -> None:
    """Re-drive both policies on the scenario (deterministic, so the same runs as in the
    results) and write their videos side by side, the failing one on the left."""
    import cv2

    from steerloop.agents import load_policy
    from steerloop.evaluation.runner import close_env_pool
    from steerloop.evaluation.video import VideoWriter

    scenario = plan.suites[primary].scenarios[index]
    parts = []
    for row in (fail, ok):
        part = path_under(path.parent, shorten(f"{path.stem}-{row.name}", VIDEO_STEM_MAX) + ".mp4")
        run_scenario(load_policy(plan.checkpoint(row.name), plan.policy_kwargs(row.name)), scenario,
                     resolution=plan.config.resolution, video=str(part), name=row.name)
        parts.append(part)
    close_env_pool()
    readers = [cv2.VideoCapture(str(p)) for p in parts]
    last = [None, None]
    with VideoWriter(path) as writer:
        while True:
            frames = []
            for k, reader in enumerate(readers):
                ok_read, frame = reader.read()
                if ok_read:
                    last[k] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                frames.append(ok_read)
            if not any(frames):
                break
            writer.append(np.concatenate(last, axis=1))
    for reader, part in zip(readers, parts):
        reader.release()
        part.unlink()


# ----------------------------------------------------------------------------- findings
def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else math.nan


def findings(rows: list[PolicyRow], corr: dict, compounding: dict, primary: str, dagger=()) -> list[str]:
    out = []
    zeros = rows[0].zeros["rmse"]
    n_routes = rows[0].results[primary][0]["aggregate"]["scenarios"]
    good_offline = [r for r in rows if r.offline["rmse"] < zeros / 2]
    drivers = [r for r in rows if (r.closed["success_rate"] or 0) >= 0.8]
    gap = [r for r in good_offline if (r.closed["success_rate"] or 0) < 0.5]
    out.append(f"**The gap.** {len(good_offline)} of {len(rows)} policies predict the held-out steering with an "
               f"RMSE below half the all-zeros baseline ({zeros / 2:.4f}). "
               + (f"{len(gap)} of them fail more than half of the {n_routes} `{primary}` routes: "
                  + ", ".join(f"{r.name} (RMSE {r.offline['rmse']:.4f}, success {r.closed['success_rate']:.2f})"
                              for r in gap) + "."
                  if gap else "None of them fails more than half of the routes: this population does not show the "
                  "gap at that threshold.")
               + (f" {len(drivers)} policies complete at least 80% of the routes with no departure "
                  f"(best: {closed_loop_order(rows)[0].name})." if drivers else
                  " No policy completes 80% of the routes without a departure."))
    success_corr = {off: corr[(off, "success_rate")]["pearson"][0] for off in OFFLINE_METRICS
                    if (off, "success_rate") in corr}
    valid = {k: v for k, v in success_corr.items() if not math.isnan(v)}
    if valid:
        best = max(valid, key=lambda k: abs(valid[k]))
        r_rmse = valid.get("rmse", math.nan)
        text = (f"**Which offline metric predicts driving (Codevilla et al.).** Across {len(rows)} policies, "
                f"the offline metric most correlated with success rate is `{best}` (Pearson r = {valid[best]:+.2f}); "
                f"RMSE gives r = {r_rmse:+.2f}. ")
        others = [abs(valid[k]) for k in ("mae", "qce", "tre") if k in valid]
        if not math.isnan(r_rmse) and others and max(others) > abs(r_rmse):
            text += (f"As in Codevilla et al. (MSE r = {CODEVILLA_MSE_R}, MAE/QCE/TRE r > {CODEVILLA_OTHER_R}), a "
                     "metric other than the squared error correlates better than RMSE" + (", and above 0.6." if max(others) > CODEVILLA_OTHER_R
                                                            else ", though not above 0.6: reproduced only in part."))
        else:
            text += ("This does not reproduce Codevilla et al.'s finding that MAE, QCE or TRE correlate better than "
                     "the squared error.")
        out.append(text + " With a population this small the intervals in the correlation table are wide.")
    else:
        out.append("**Which offline metric predicts driving.** Success rate is the same for every policy, so no "
                   "correlation with it can be computed: the suite does not separate these policies.")
    twins = [(a, b) for a in rows for b in rows
             if abs(a.offline["rmse"] - b.offline["rmse"]) <= SIMILAR_RMSE * max(a.offline["rmse"], b.offline["rmse"])
             and (a.closed["success_rate"] or 0) - (b.closed["success_rate"] or 0) >= 0.5]
    if twins:
        a, b = max(twins, key=lambda p: (p[0].closed["success_rate"] or 0) - (p[1].closed["success_rate"] or 0))
        out.append(f"**Equal offline error, different driving.** {a.name} and {b.name} have offline RMSE "
                   f"{a.offline['rmse']:.4f} and {b.offline['rmse']:.4f} (within {SIMILAR_RMSE:.0%}) but succeed on "
                   f"{a.closed['success_rate']:.2f} and {b.closed['success_rate']:.2f} of the routes, as Codevilla et "
                   "al. observed.")
    best_offline = min(rows, key=lambda r: r.offline["rmse"])
    better = [r for r in rows if (r.closed["success_rate"] or 0) > (best_offline.closed["success_rate"] or 0)]
    out.append(f"**Best offline is not best on the road (comma.ai).** The policy with the lowest offline RMSE, "
               f"{best_offline.name} ({best_offline.offline['rmse']:.4f}), has success "
               f"{best_offline.closed['success_rate']:.2f}; {len(better)} of {len(rows)} policies drive with a "
               "strictly higher success rate. "
               + ("The published finding reproduces." if better else
                  "None drives better: the published finding does not reproduce in this population."))
    recurrent = [r for r in rows if r.recurrent]
    single = [r for r in rows if not r.recurrent]
    if recurrent and single:
        s_rec, s_single = _mean(r.closed["success_rate"] for r in recurrent), _mean(r.closed["success_rate"]
                                                                                  for r in single)
        o_rec, o_single = _mean(r.offline["rmse"] for r in recurrent), _mean(r.offline["rmse"] for r in single)
        verdict = "helps" if s_rec > s_single else "hurts" if s_rec < s_single else "makes no difference"
        out.append(f"**History in closed loop.** Recurrent policies (with history) average success {s_rec:.2f} and "
                   f"offline RMSE {o_rec:.4f}; single-frame policies {s_single:.2f} and {o_single:.4f}. History "
                   f"{verdict} in closed loop here"
                   + (", although it predicts better offline (the copycat pattern)." if o_rec < o_single and
                      s_rec < s_single else "."))
    regimes = {}
    for r in rows:
        if r.regime != "user":  # a user's policy is not a data regime of the study
            regimes.setdefault(r.regime, []).append(r)
    if len(regimes) > 1:
        parts = [f"{name}: success {_mean(x.closed['success_rate'] for x in members):.2f}, recovery "
                 f"{_fmt(_mean(x.closed['recovery_rate'] for x in members), 2)}, on-policy RMSE "
                 f"{_mean(x.closed['on_policy_rmse'] for x in members):.4f} (n={len(members)})"
                 for name, members in sorted(regimes.items())]
        out.append("**Data regimes (DART noise, side cameras, DAgger).** " + "; ".join(parts) + ".")
    for policy, init, matched in dagger:
        control = max(matched, key=lambda m: m.closed["success_rate"] or 0.0) if matched else None
        beats = (policy.closed["success_rate"] or 0) > (init.closed["success_rate"] or 0) and (
            control is None or (policy.closed["success_rate"] or 0) > (control.closed["success_rate"] or 0))
        out.append(f"**DAgger (Ross et al.).** {policy.name} ({policy.frames} expert-labelled frames) succeeds on "
                   f"{policy.closed['success_rate']:.2f} of the routes, against {init.closed['success_rate']:.2f} for "
                   f"{init.name}, the behaviour-cloning policy it started from"
                   + (f", and {control.closed['success_rate']:.2f} for {control.name}, behaviour cloning on "
                      f"{control.frames} expert frames" if control else ", with no frame-matched behaviour-cloning "
                      "control in the study")
                   + (". DAgger wins." if beats else
                      ". Its starting policy already succeeds everywhere, so this pair cannot show a difference."
                      if (init.closed["success_rate"] or 0) >= 1.0 else
                      ". DAgger does not win here: the published finding does not reproduce in this setup."))
    ratios = [r.closed["on_policy_rmse"] / r.offline["rmse"] for r in rows if r.closed["on_policy_rmse"]]
    if ratios:
        grew = [f for f, c in compounding.items() if c["offset_last_10s"] > c["offset_first_10s"]]
        out.append(f"**Compounding error.** On their own states the policies' steering error is "
                   f"{min(ratios):.1f}x to {max(ratios):.1f}x their offline error (median {np.median(ratios):.1f}x). "
                   + (f"Mean |offset| grows from the first to the last 10 s of the routes for: {', '.join(grew)}."
                      if grew else "Mean |offset| does not grow over the routes for any family."))
    return out


def dagger_comparisons(rows: list[PolicyRow], plan) -> list[tuple[PolicyRow, PolicyRow, list[PolicyRow]]]:
    """(DAgger policy, the behaviour-cloning policy it started from, behaviour-cloning
    policies of the same architecture with at least as many expert-labelled frames)."""
    by_name = {r.name: r for r in rows}
    out = []
    for r in rows:
        stage = plan.policies[r.name]
        if stage.kind != "dagger":
            continue
        init = by_name[stage.params["init"]]
        matched = [b for b in rows if plan.policies[b.name].kind == "train" and b.arch == r.arch
                   and b.frames >= MATCHED_FRAMES * r.frames and b is not init]
        out.append((r, init, matched))
    return out


def dagger_table(comparisons) -> str:
    lines = ["| DAgger policy | compared with | expert-labelled frames | success | mean abs offset [m] | recovery | "
             "on-policy RMSE |", "|---|---|---|---|---|---|---|"]
    for dagger, init, matched in comparisons:
        for row, role in ((dagger, "DAgger"), (init, "BC it started from"), *((m, "BC, as many frames") for m in matched)):
            lines.append(f"| {dagger.name} | {row.name} ({role}) | {row.frames} | {_fmt(row.closed['success_rate'], 2)} "
                         f"| {_fmt(row.closed['mean_abs_offset_m'])} | {_fmt(row.closed['recovery_rate'], 2)} | "
                         f"{_fmt(row.closed['on_policy_rmse'], 4)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- history and copycat
SWEEP_MIN = 3  # policies of one recipe with this many distinct windows make a history-length sweep
MODE_LABELS = {"teacher": "teacher forcing", "scheduled": "scheduled sampling", "dropout": "past-input dropout",
               "keyframe": "keyframe weighting"}


def _get(d: dict | None, *keys):
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def offline_with_logged_inputs(r: PolicyRow) -> float:
    """The offline RMSE a standard replay reports: teacher forced for a fed-back model (the
    logged commands in its loop), the plain replay otherwise."""
    forced = _get(r.history, "teacher_forced", "rmse")
    return forced if r.history.get("fed_back") and forced is not None else r.offline["rmse"]


def _inputs_label(r: PolicyRow) -> str:
    extra = [i for i in r.history.get("inputs", ["image"]) if i != "image"]
    if r.arch == "komanda":
        extra = ["own outputs"] + [i for i in extra if i != "prev_steering"]
    return "frames only" if not extra else "frames + " + ", ".join(extra)


def _probe_ratio(r: PolicyRow) -> float | None:
    probe, expert = r.history.get("probe"), r.history.get("expert_probe")
    return probe_ratio(probe, expert) if probe and expert else None


def history_table(rows: list[PolicyRow]) -> str:
    head = ("| policy | arch | inputs | trained with | T | offline RMSE, logged inputs | free running | "
            "change-points | steady | success | recovery | on-policy RMSE | probe R^2 (own steering) | "
            "probe ratio vs expert |")
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in rows:
        events = _get(r.history, "events", "model") or {}
        mode = MODE_LABELS.get(r.history.get("mode"), r.history.get("mode")) if (
            r.history.get("fed_back") or r.history.get("mode") == "keyframe") else "-"
        lines.append(f"| {r.name} | {r.arch} | {_inputs_label(r)} | {mode} | {r.history.get('seq_len', 'n/a')} | "
                     f"{_fmt(offline_with_logged_inputs(r), 4)} | "
                     f"{_fmt(r.offline['rmse'], 4) if r.history.get('fed_back') else '(same)'} | "
                     f"{_fmt(events.get('change_point_rmse'), 4)} | {_fmt(events.get('steady_rmse'), 4)} | "
                     f"{_fmt(r.closed['success_rate'], 2)} | {_fmt(r.closed['recovery_rate'], 2)} | "
                     f"{_fmt(r.closed['on_policy_rmse'], 4)} | {_fmt(_get(r.history, 'probe', 'r2'), 4)} | "
                     f"{_fmt(_probe_ratio(r), 2)} |")
    return "\n".join(lines)


def history_baselines(rows: list[PolicyRow]) -> str:
    """One line: all-zeros, repeat-previous (with its event split) and the expert's probe."""
    r = rows[0]
    repeat = r.history.get("repeat_previous") or {}
    events = _get(r.history, "events", "repeat_previous") or {}
    probe = r.history.get("expert_probe") or {}
    return (f"Baselines on the held-out logs: all-zeros RMSE {_fmt(r.zeros['rmse'], 4)}; repeat the previous "
            f"executed command (a pure copycat) RMSE {_fmt(repeat.get('rmse'), 4)}, at change-points "
            f"{_fmt(events.get('change_point_rmse'), 4)}, on steady segments {_fmt(events.get('steady_rmse'), 4)}. "
            f"Copycat probe on the expert's logged steering: the previous {probe.get('k', 'k')} commands explain "
            f"R^2 = {_fmt(probe.get('r2'), 4)} of the next.")


def sweep_groups(rows: list[PolicyRow]) -> list[list[PolicyRow]]:
    """Policies trained with one recipe except the window length, at SWEEP_MIN or more
    distinct lengths, sorted by it (the history-length sweep)."""
    groups: dict[str, list[PolicyRow]] = {}
    for r in rows:
        if r.history.get("seq_len") is not None and r.history.get("recipe"):
            groups.setdefault(json.dumps(r.history["recipe"], sort_keys=True), []).append(r)
    return [sorted(g, key=lambda r: r.history["seq_len"]) for g in groups.values()
            if len({r.history["seq_len"] for r in g}) >= SWEEP_MIN]


def sweep_table(groups: list[list[PolicyRow]], rows: list[PolicyRow]) -> str:
    lines = ["| policy | arch | inputs | T [frames] | offline RMSE, logged inputs | success | recovery | "
             "on-policy RMSE |", "|---|---|---|---|---|---|---|---|"]
    listed = [r for g in groups for r in g] + [r for r in rows if r.arch == "chauffeur"]
    for r in listed:
        lines.append(f"| {r.name} | {r.arch} | {_inputs_label(r)} | {r.history.get('seq_len')} | "
                     f"{_fmt(offline_with_logged_inputs(r), 4)} | {_fmt(r.closed['success_rate'], 2)} | "
                     f"{_fmt(r.closed['recovery_rate'], 2)} | {_fmt(r.closed['on_policy_rmse'], 4)} |")
    return "\n".join(lines)


def _verdict(with_history: float, without: float) -> str:
    if math.isnan(with_history) or math.isnan(without):
        return "cannot be judged"
    return "helps" if with_history > without else "hurts" if with_history < without else "makes no difference"


def history_findings(rows: list[PolicyRow]) -> list[str]:
    """Findings of the History and copycat section, from the numbers, whichever way they point."""
    out = []
    fed = [r for r in rows if r.history.get("fed_back")]
    frames_only = [r for r in rows if not r.history.get("fed_back")]
    repeat = _get(rows[0].history, "repeat_previous", "rmse")
    if repeat is not None:
        beat = [r for r in rows if offline_with_logged_inputs(r) < repeat]
        out.append(f"**The copycat's free offline score.** Repeating the previous executed command scores RMSE "
                   f"{repeat:.4f} on the held-out logs (all-zeros {rows[0].zeros['rmse']:.4f}). "
                   + (f"{len(beat)} of {len(rows)} policies beat it offline (fed-back models replayed with the logged "
                      "commands in their loop): " + ", ".join(f"{r.name} ({offline_with_logged_inputs(r):.4f})"
                                                             for r in beat) + "."
                      if beat else f"None of the {len(rows)} policies beats it offline: an offline table without this "
                      "baseline would flatter every one of them."))
    pairs = [(r, r.history["teacher_forced"]["rmse"], r.offline["rmse"]) for r in fed if r.history.get("teacher_forced")]
    if pairs:
        worse = [p for p in pairs if p[2] > p[1]]
        out.append("**Teacher forced vs free running, offline.** With the logged commands in their loop the fed-back "
                   "models score " + ", ".join(f"{r.name} {t:.4f} (free running {f:.4f})" for r, t, f in pairs)
                   + f"; feeding back their own outputs on the same frames is worse for {len(worse)} of {len(pairs)}.")
    if fed and frames_only:
        s_fed, s_frames = _mean(r.closed["success_rate"] for r in fed), _mean(r.closed["success_rate"]
                                                                             for r in frames_only)
        rec_fed, rec_frames = _mean(r.closed["recovery_rate"] for r in fed), _mean(r.closed["recovery_rate"]
                                                                                  for r in frames_only)
        o_fed, o_frames = _mean(offline_with_logged_inputs(r) for r in fed), _mean(offline_with_logged_inputs(r)
                                                                                  for r in frames_only)
        copycat = o_fed < o_frames and s_fed < s_frames
        out.append(f"**Does feeding back the previous command help?** Policies with fed-back inputs (n={len(fed)}) "
                   f"average success {s_fed:.2f}, recovery {_fmt(rec_fed, 2)}, offline RMSE {o_fed:.4f}; frames-only "
                   f"policies (n={len(frames_only)}) {s_frames:.2f}, {_fmt(rec_frames, 2)}, {o_frames:.4f}. Feeding "
                   f"back the previous command {_verdict(s_fed, s_frames)} in closed loop here"
                   + (", although it predicts better offline: the copycat pattern." if copycat else
                      "; the copycat pattern (better offline, worse on the road) does not appear." if o_fed < o_frames
                      else ", and it does not predict better offline either."))
    ratios = [(r, _get(r.history, "events", "model", "change_point_rmse"), _get(r.history, "events", "model",
                                                                                "steady_rmse")) for r in rows]
    ratios = [(r, c / s) for r, c, s in ratios if c is not None and s]
    if ratios:
        rp = _get(rows[0].history, "events", "repeat_previous") or {}
        rp_ratio = rp["change_point_rmse"] / rp["steady_rmse"] if rp.get("steady_rmse") else math.nan
        fed_ratio = _mean(x for r, x in ratios if r.history.get("fed_back"))
        frames_ratio = _mean(x for r, x in ratios if not r.history.get("fed_back"))
        out.append(f"**Where the error is: change-points vs steady driving.** The repeat-previous baseline's error is "
                   f"{_fmt(rp_ratio, 1)}x larger at the expert's steering change-points than on steady segments. "
                   f"Fed-back policies: {_fmt(fed_ratio, 1)}x on average; frames-only policies: "
                   f"{_fmt(frames_ratio, 1)}x. Largest: {max(ratios, key=lambda p: p[1])[0].name} "
                   f"({max(x for _, x in ratios):.1f}x).")
    probed = [(r, _probe_ratio(r)) for r in rows if _probe_ratio(r) is not None]
    if probed:
        expert_r2 = _get(rows[0].history, "expert_probe", "r2")
        below = [(r, x) for r, x in probed if x < 1.0]
        text = (f"**Copycat probe (Wen et al. 2020).** The previous {rows[0].history['expert_probe']['k']} commands "
                f"explain R^2 = {_fmt(expert_r2, 4)} of the expert's next command on the held-out logs. "
                + (f"{len(below)} of {len(probed)} policies steer more predictably from their own past than the expert "
                   f"(unexplained-variance ratio < 1): " + ", ".join(f"{r.name} ({x:.2f})" for r, x in below) + ". "
                   if below else "No policy steers more predictably from its own past than the expert. "))
        if len(probed) >= 3:
            rho = spearman([x for _, x in probed], [r.closed["success_rate"] or 0.0 for r, _ in probed])
            text += ("Success is the same for every policy, so it cannot be related to the ratio." if math.isnan(rho)
                     else f"Across policies the ratio and success rate have Spearman rho = {rho:+.2f}"
                     + (" (the more self-predictable, the worse it drives)." if rho > 0 else
                        " (self-predictability does not go with worse driving here)."))
        out.append(text)
    by_arch: dict[str, dict[str, list[PolicyRow]]] = {}
    for r in fed:
        by_arch.setdefault(r.arch, {}).setdefault(r.history.get("mode", "teacher"), []).append(r)
    for arch, modes in by_arch.items():
        if len(modes) < 2:
            continue
        parts = {m: (_mean(r.closed["success_rate"] for r in g), _mean(r.closed["recovery_rate"] for r in g), len(g))
                 for m, g in modes.items()}

        def rank(mode: str) -> tuple[float, float]:  # success first, then recovery
            success, recovery, _ = parts[mode]
            return (success, -1.0 if math.isnan(recovery) else recovery)

        best = max(sorted(parts), key=rank)
        verdict = ("." if "teacher" not in parts else
                   ", better than teacher forcing." if best != "teacher" and rank(best) > rank("teacher") else
                   "; no remedy beats plain teacher forcing here.")
        out.append(f"**Training the fed-back inputs ({arch}).** " + "; ".join(
            f"{MODE_LABELS.get(m, m)}: success {v[0]:.2f}, recovery {_fmt(v[1], 2)} (n={v[2]})"
            for m, v in sorted(parts.items())) + f". Best in closed loop (success, then recovery): "
            f"{MODE_LABELS.get(best, best)}{verdict}")
    for group in sweep_groups(rows):
        lengths = [r.history["seq_len"] for r in group]
        success = [r.closed["success_rate"] or 0.0 for r in group]
        rho = spearman(lengths, success)
        trend = ("longer windows drive better" if rho > 0 else "longer windows drive worse" if rho < 0
                 else "no trend" if not math.isnan(rho) else "no trend (success is the same at every length)")
        out.append(f"**History length ({group[0].arch}, {_inputs_label(group[0])}).** Success at T = "
                   + ", ".join(f"{t}: {x:.2f}" for t, x in zip(lengths, success))
                   + f" (Spearman rho {_fmt(rho, 2)}): {trend}.")
    return out


# ----------------------------------------------------------------------------- report
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
          "## Findings", "", *[f"- {line}" for line in findings(rows, corr, compounding, primary, dagger)], "",
          "## Policies: offline beside closed loop", "", policy_table(rows), "",
          "Offline metrics on held-out logs, with the all-zeros predictor:", "", offline_table(rows), "",
          "## Correlation across the population (Codevilla et al. style)", "",
          f"Pearson r and Spearman ρ with 95% bootstrap intervals over policies ({BOOTSTRAP_RESAMPLES} resamples). "
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
    summary = {"policies": [{"name": r.name, "family": r.family, "regime": r.regime, "frames": r.frames,
                             "val_rmse": r.val_rmse, "offline": r.offline, "zeros": r.zeros, "closed_loop": r.closed,
                             "history": {k: v for k, v in r.history.items() if k != "recipe"}}
                            for r in rows],
               "correlations": [{"offline": k[0], "closed_loop": k[1], **v} for k, v in corr.items()],
               "best_offline": best_offline.name, "best_offline_closed_loop_rank": order.index(best_offline) + 1}
    path_under(plan.out, "report.json").write_text(json.dumps(json_safe(summary), indent=1, sort_keys=True))
    return path
