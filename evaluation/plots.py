"""Per-scenario figures from saved trajectories (matplotlib, PNG): no simulator re-run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from steerloop.evaluation.metrics import departure_events  # noqa: E402
from steerloop.sim.env import load_track  # noqa: E402
from steerloop.paths import path_under  # noqa: E402

PHASE_COLOURS = {1: "tab:red", 2: "tab:orange"}  # perturbation acting / recovery window


def scenario_figure(trajectory: dict, track_spec, path: str | Path, *, title: str = "",
                    departure_threshold: float = 1.0, track_length: float = 400.0) -> None:
    """Top-down trajectory over the track (departures marked) beside lateral offset over time
    (perturbation phases shaded, departure threshold drawn)."""
    track = load_track(track_spec, length=track_length)
    fig, (top, side) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.5]})
    s = np.linspace(0, track.length, 600)
    for offset, style in ((-track.lane_width / 2, "k-"), (track.lane_width / 2, "k--"), (1.5 * track.lane_width, "k-")):
        x, y = track.lateral_points(s, offset)
        top.plot(x, y, style, lw=0.6)
    x, y = np.asarray(trajectory["x"]), np.asarray(trajectory["y"])
    top.plot(x, y, color="tab:blue", lw=1.2, label="car")
    offset = np.asarray(trajectory["lateral_offset"])
    events = departure_events(offset, departure_threshold)
    if len(events):
        top.plot(x[events], y[events], "rx", ms=8, label="departure")
    top.set_aspect("equal")
    top.set_title("top-down")
    top.legend(loc="best", fontsize=8)
    t = np.asarray(trajectory["time"])
    phase = np.asarray(trajectory.get("perturbation_phase", np.zeros_like(t)))
    for value, colour in PHASE_COLOURS.items():
        mask = phase == value
        if mask.any():
            side.fill_between(t, -3, 3, where=mask, color=colour, alpha=0.15, step="mid",
                              label="perturbation" if value == 1 else "recovery window")
    side.plot(t, offset, color="tab:blue", lw=1.0, label="lateral offset")
    for sign in (-1, 1):
        side.axhline(sign * departure_threshold, color="r", lw=0.6, ls=":")
    if len(events):
        side.plot(t[events], offset[events], "rx", ms=8)
    side.set_ylim(-max(2.0, np.abs(offset).max() * 1.1), max(2.0, np.abs(offset).max() * 1.1))
    side.set_xlabel("time [s]")
    side.set_ylabel("lateral offset [m] (+ left)")
    side.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_results(out: str | Path, results: dict, suite) -> list[Path]:
    """One PNG per scenario in ``out/plots``."""
    out = Path(out)
    path_under(out, "plots").mkdir(parents=True, exist_ok=True)
    paths = []
    for scenario in suite.scenarios:
        trajectory = dict(np.load(path_under(out, "trajectories", f"{scenario.name}.npz")))
        path = path_under(out, "plots", f"{scenario.name}.png")
        scenario_figure(trajectory, scenario.track, path, title=f"{results['policy']['name']}: {scenario.name}",
                        track_length=scenario.track_length)
        paths.append(path)
    return paths
