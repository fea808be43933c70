"""End-to-end tests of the ``steerloop`` command line (run as ``python -m evaluation.cli``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import SHORT_SPEC


def _run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerloop", *args], capture_output=True, text=True,
                          timeout=timeout)


def _last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli") / "short.json"
    path.write_text(json.dumps(SHORT_SPEC))
    return str(path)


@pytest.fixture(scope="module")
def drive_json(spec_file) -> subprocess.CompletedProcess:
    return _run("drive", "--policy", "expert", "--track", spec_file, "--resolution", "16x32", "--json")


def test_drive_json_summary(drive_json):
    assert drive_json.returncode == 0, drive_json.stderr
    summary = _last_json_line(drive_json.stdout)
    for key in ("success", "mean_abs_offset_m", "max_abs_offset_m", "departures", "steps"):
        assert key in summary, key
    assert summary["success"] is True
    assert summary["departures"] == 0
    assert 0 <= summary["mean_abs_offset_m"] <= summary["max_abs_offset_m"] < 0.3
    assert 100 < summary["steps"] < 300
    assert summary["track"] == "short" and summary["policy"] == "expert"


def test_drive_json_stdout_is_exactly_one_json_object(drive_json):
    assert drive_json.returncode == 0, drive_json.stderr
    assert isinstance(json.loads(drive_json.stdout), dict)


def test_drive_writes_video(spec_file, tmp_path):
    video = tmp_path / "out" / "episode.mp4"
    result = _run("drive", "--policy", "expert", "--track", spec_file, "--resolution", "16x32", "--json",
                  "--video", str(video))
    assert result.returncode == 0, result.stderr
    assert video.is_file() and video.stat().st_size > 1000
    assert video.read_bytes()[4:8] == b"ftyp"  # an ISO-BMFF (MP4) file


def test_drive_missing_track_file_fails_naming_it(tmp_path):
    missing = tmp_path / "no-such-track.json"
    result = _run("drive", "--track", str(missing), "--resolution", "16x32", "--json")
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_drive_invalid_track_spec_fails_naming_it(tmp_path):
    bad = tmp_path / "bad-track.json"
    bad.write_text('{"segments": [{"type": "spiral", "length": 10}]}')
    result = _run("drive", "--track", str(bad), "--resolution", "16x32")
    assert result.returncode != 0
    assert "bad-track.json" in result.stderr and "spiral" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_env_json():
    result = _run("bench", "env", "--steps", "20", "--repeats", "1", "--resolution", "16x32", "--json")
    assert result.returncode == 0, result.stderr
    bench = _last_json_line(result.stdout)
    for key in ("render_fps", "physics_steps_per_s", "env_steps_per_s", "env_overhead_ratio"):
        assert isinstance(bench[key], (int, float)) and bench[key] > 0, key
    assert bench["resolution"] == [16, 32]
    # flat, default, the richest condition and it with oncoming traffic side by side, each with its ratio to flat
    assert set(bench["conditions"]) == {"flat", "default", "town-rain", "town-traffic.rain.dashcam", "mountain-fog"}
    rows = bench["conditions"]
    traffic, without = rows["town-traffic.rain.dashcam"], rows["town-rain"]
    assert traffic["env_over_without_traffic"] == round(traffic["env_steps_per_s"] / without["env_steps_per_s"], 3)
    assert rows["flat"]["env_over_flat"] == 1.0
    for row in rows.values():
        assert row["env_over_flat"] == round(row["env_steps_per_s"] / rows["flat"]["env_steps_per_s"], 3)
        assert row["env_overhead_ratio"] > 0
    # the image-formation effects' own cost per frame: town-rain has fog, rain, blur, noise and JPEG, flat none
    assert rows["town-rain"]["image_formation_ms_per_frame"] > rows["flat"]["image_formation_ms_per_frame"] >= 0
    # counted as the simulator's work instead, the effects leave less to the environment
    assert rows["town-rain"]["env_over_simulator"] < rows["town-rain"]["env_overhead_ratio"]
    assert rows["flat"]["env_over_simulator"] <= rows["flat"]["env_overhead_ratio"]
    assert bench["env_steps_per_s"] == rows["default"]["env_steps_per_s"]


def test_bench_soak_refuses_an_unknown_condition():
    result = _run("bench", "soak", "--condition", "town.rian", "--episodes", "1")
    assert result.returncode == 2 and "unknown weather 'rian' (did you mean 'rain'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_batch_default_is_the_runners():
    from steerloop.evaluation.cli import build_parser
    from steerloop.evaluation.runner import DEFAULT_BATCH

    args = build_parser().parse_args(["evaluate", "--policy", "zeros", "--out", "unused"])
    assert args.batch == DEFAULT_BATCH
