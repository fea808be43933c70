"""The report's figures (PNG) and the side-by-side video of a failing and a succeeding policy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from steerloop.evaluation.report.rows import AFTER_PERTURBATION_S, PolicyRow, SMOOTHING_S, VIDEO_STEM_MAX  # noqa: E402
from steerloop.evaluation.runner import run_scenario  # noqa: E402
from steerloop.evaluation.suites import CONTROL_DT  # noqa: E402
from steerloop.paths import path_under, shorten  # noqa: E402
from steerloop.sim.env import load_track  # noqa: E402


# ----------------------------------------------------------------------------- figures
def _scatter(rows, y_key: str, ylabel: str, path: Path) -> None:
    """Offline RMSE against a closed-loop metric, coloured by family; the checkpoints along
    one training run are joined in epoch order (dashed), ending at the run's best checkpoint."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    families = sorted({r.family for r in rows})
    joined = False
    for i, family in enumerate(families):
        pts = [(r.offline["rmse"], r.closed[y_key], r.name) for r in rows if r.family == family
               and r.closed.get(y_key) is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=family, color=f"C{i}")
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for run in sorted({r.run for r in rows if r.family == family and r.epoch is not None}):
            line = sorted((r for r in rows if r.run == run and r.closed.get(y_key) is not None),
                          key=lambda r: (r.epoch is None, r.epoch or 0))  # checkpoints by epoch, then the run's best
            ax.plot([r.offline["rmse"] for r in line], [r.closed[y_key] for r in line], color=f"C{i}", ls="--",
                    lw=0.8, alpha=0.7, label=None if joined else "checkpoints of one run")
            joined = True
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
