"""``steerloop study --plan``: stage counts, and the compute estimate from measured stage
times, checked against numbers computed by hand from hand-written stage markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerloop.evaluation.cli import main
from steerloop.evaluation.estimate import estimate, read_timings
from steerloop.evaluation.study import load_study, plan_study

STUDY = """
[study]
name = "planned"
suites = ["smoke"]          # 150 + 150 + 400 m at 10 m/s: 1400 steps, 2 lockstep groups
offline_data = "val"
threads = 2

[datasets.clean]
episodes = 4
track_length = 200.0

[datasets.val]
suite = "val"
episodes = 1
track_length = 100.0

[policies.p]
model = "pilotnet"
data = ["clean"]
epochs = 2
checkpoints = [1]

[policies.l]
model = "cnn-lstm"
data = ["clean"]
epochs = 1

[policies.d]
dagger = { init = "p", iterations = 2, episodes_per_iter = 1, epochs = 1, track_length = 100.0 }
"""


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _marker(root: Path, kind: str, name: str, seconds: float, out: Path, **summary) -> None:
    _write(root / "stages" / f"{kind}-{name}.json",
           {"kind": kind, "name": name, "key": "0", "out": str(out), "seconds": seconds, "summary": summary})


def measured_study(root: Path) -> Path:
    """A measured study's output, by hand (2 cores):

    - record: 2 episodes x 100 m, 500 frames (400 nominal steps: 1.25 frames per step) in 10 s:
      20 core-s / 0.2 camera-km = 100 core-s per camera-km;
    - train pilotnet: 3 epochs x 500 frames in 30 s on 2 threads: 60 / 1.5 = 40 core-s per 1000 frame-epochs;
    - offline: 1000 frames in 5 s: 0.01 core-s per frame;
    - closed loop: 2 x 100 m at 10 m/s (400 steps) in 40 s: 0.2 core-s per step;
    - DAgger: 1 iteration (1 episode x 100 m, then 2 epochs on 500 + 300 frames) in 50 s: 100 core-s
      where the rates predict 100 x 0.1 + 40 x 1.6 = 74, a factor of 100/74;
    - a skipped checkpoint's stage (ignored)."""
    data = root / "datasets" / "a-1"
    _write(data / "manifest.json", {"config": {"episodes": 2, "track_length": 100.0, "cameras": ["center"],
                                               "speed": 10.0}, "episodes": {"0": {"length": 250}, "1": {"length": 250}}})
    _marker(root, "record", "a", 10.0, data, frames=500)
    _write(root / "policies" / "p-2" / "train_config.json",
           {"model": "pilotnet", "data": [str(data)], "camera": "center", "threads": 2})
    _marker(root, "train", "p", 30.0, root / "policies" / "p-2", epochs_run=3)
    _write(root / "offline" / "p-3" / "offline.json", {"model": {"frames": 1000}})
    _marker(root, "offline", "p", 5.0, root / "offline" / "p-3")
    _write(root / "closed_loop" / "p-4" / "s" / "run.json",
           {"suite": {"scenarios": [{"track_length": 100.0, "speed": 10.0}] * 2}})
    _marker(root, "closed_loop", "p@s", 40.0, root / "closed_loop" / "p-4" / "s")
    dagger = root / "policies" / "d-5"
    _write(dagger / "dagger.json", {"config": {"episodes_per_iter": 1, "track_length": 100.0}, "iterations": [{}]})
    _write(dagger / "iter_00" / "data" / "manifest.json", {"episodes": {"0": {"length": 300}}})
    _write(dagger / "iter_00" / "model" / "train_config.json",
           {"model": "pilotnet", "data": [str(data), str(dagger / "iter_00" / "data")], "threads": 2})
    _write(dagger / "iter_00" / "model" / "trainer_state" / "progress.json", {"epoch": 2})
    _marker(root, "dagger", "d", 50.0, dagger, iterations=1)
    _marker(root, "offline", "p-e09", 0.0, root / "offline" / "p-3", skipped="never reached")
    return root


def test_the_estimate_is_the_hand_computed_one(tmp_path):
    """The planned study, by hand (4 workers, 2 driver threads; planned frames = nominal steps x 1.25):

    - record clean 4 x 200 m = 0.8 camera-km: 80 core-s, wall 80/4; val 0.1: 10 core-s, wall 10/1;
    - train p 2 epochs x 2000 frames = 4: 160 core-s; l (cnn-lstm, pooled rate 40) 1 x 2000 = 2: 80; wall / 2;
    - dagger d (pilotnet, from p's 2000 frames, 250 frames per iteration): record 0.2 camera-km x 100,
      train 40 x (2.25 + 2.5), both x 100/74; wall: record / 1 worker + train / 2;
    - offline 4 policies (p, p-e01, l, d) x 250 frames x 0.01;
    - closed loop 4 x 1400 steps x 0.2 = 4 x 280 core-s, wall 280 / 2 groups each."""
    timings = read_timings(measured_study(tmp_path / "measured"), cores=2)
    plan = plan_study(load_study(str(_study(tmp_path))), tmp_path / "planned")
    result = estimate(plan, timings, workers=4)
    factor = 100 / 74
    expected = {"record": (90.0, 30.0), "train": (240.0, 120.0),
                "dagger": ((20 + 190) * factor, 20 * factor + 190 * factor / 2),
                "offline": (10.0, 5.0), "closed_loop": (1120.0, 560.0)}
    for kind, (core_s, wall_s) in expected.items():
        assert result[kind]["core_s"] == pytest.approx(core_s), kind
        assert result[kind]["wall_s"] == pytest.approx(wall_s), kind
        assert result[kind]["unmeasured"] == 0
    assert result["train"]["pooled"] == {"cnn-lstm"} and result["offline"]["pooled"] == {"cnn-lstm"}
    assert result["total"]["core_s"] == pytest.approx(90 + 240 + 210 * factor + 10 + 1120)
    assert result["total"]["wall_s"] == pytest.approx(30 + 120 + 20 * factor + 95 * factor + 5 + 560)


def _study(tmp_path: Path) -> Path:
    path = tmp_path / "planned.toml"
    path.write_text(STUDY)
    return path


def test_plan_prints_counts_and_the_estimate_without_running(tmp_path, capsys, monkeypatch):
    measured = measured_study(tmp_path / "measured")
    config = _study(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["study", "--config", str(config), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert "4 policies (3 training runs, 1 checkpoints along training), 13 stages" in printed
    for line in ("record          2", "train           2", "dagger          1", "offline         4",
                 "closed_loop     4", "give --timings DIR"):
        assert line in printed, line
    assert main(["study", "--config", str(config), "--plan", "--timings", str(measured), "--workers", "4"]) == 0
    printed = capsys.readouterr().out
    core_h, wall_h = (90 + 240 + 210 * 100 / 74 + 10 + 1120) / 3600, (30 + 120 + 115 * 100 / 74 + 5 + 560) / 3600
    assert f"  total            13        5 {core_h:>8.2f} {wall_h:>8.2f}" in printed
    assert "  record            2        1     0.03     0.01  100 core-s per camera-km" in printed
    assert "pilotnet 40 core-s per 1000 frame-epochs" in printed and "1.35 x the record and train rates" in printed
    assert "train: no measured cnn-lstm stage; used the pooled rate" in printed
    assert sorted(tmp_path.rglob("*")) == before, "--plan runs nothing and writes nothing"


def test_a_cells_held_out_logs_are_offline_work_too(tmp_path):
    """A cell with its own held-out dataset (1 x 100 m: 250 planned frames) adds one offline
    stage per policy: 4 x 250 frames x 0.01 core-s more, and its recording (0.1 camera-km)."""
    cell = ('[cells.new]\noffline_data = "val2"\nsuite = "smoke"\n\n'
            '[datasets.val2]\nsuite = "val"\nepisodes = 1\ntrack_length = 100.0\nconditions = ["dusk"]\n')
    path = tmp_path / "cells.toml"
    path.write_text(STUDY.replace("[datasets.clean]", cell + "\n[datasets.clean]"))
    plan = plan_study(load_study(str(path)), tmp_path / "planned")
    result = estimate(plan, read_timings(measured_study(tmp_path / "measured"), cores=2), workers=4)
    assert result["offline"]["stages"] == 8 and result["offline"]["core_s"] == pytest.approx(20.0)
    assert result["record"]["core_s"] == pytest.approx(100.0)


def test_a_kind_never_measured_is_left_out_and_said(tmp_path):
    measured = measured_study(tmp_path / "measured")
    for marker in (measured / "stages").glob("closed_loop-*"):
        marker.unlink()
    plan = plan_study(load_study(str(_study(tmp_path))), tmp_path / "planned")
    result = estimate(plan, read_timings(measured, cores=2), workers=4)
    assert result["closed_loop"]["unmeasured"] == 4 and result["closed_loop"]["core_s"] == 0
    assert result["total"]["core_s"] == pytest.approx(90 + 240 + 210 * 100 / 74 + 10)


@pytest.mark.parametrize("argv, message", [
    (["--plan", "--timings", "{tmp}/nowhere"], "no stage markers in"),
    (["--timings", "{tmp}"], "--timings gives the measured times for --plan's estimate: add --plan"),
    ([], "--out is required"),
    (["--plan", "--timings", "{tmp}", "--timings-cores", "0"], "--timings-cores: must be >= 1"),
])
def test_plan_bad_input_exits_2_naming_the_flag(tmp_path, capsys, argv, message):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    try:
        code = main(["study", "--config", str(_study(tmp_path)), *argv])
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_malformed_marker_is_named(tmp_path, capsys):
    measured = measured_study(tmp_path / "measured")
    _write(measured / "stages" / "broken.json", {"kind": "record"})
    assert main(["study", "--config", str(_study(tmp_path)), "--plan", "--timings", str(measured)]) == 2
    assert f"{measured / 'stages' / 'broken.json'}: not a study stage marker" in capsys.readouterr().err
