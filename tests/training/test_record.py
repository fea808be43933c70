"""Recording expert driving (training.record and ``steerloop record`` / ``validate``):
worker-count independence, DART noise labels, crash safety and resumption."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from steerloop.sim.env import LaneKeepEnv
from steerloop.driving_log import MANIFEST, DrivingLog, LogError, episode_file, validate
from steerloop.training.record import RecordConfig, episode_jobs, record

TINY = (16, 32)
TRACK_LENGTH = 60.0  # [m] procedural routes of ~120 m: ~300 steps per episode
RECORD_ARGS = ("--episodes", "3", "--resolution", "16x32", "--track-length", "60", "--quiet")


def tiny_config(out, **overrides) -> RecordConfig:
    return RecordConfig(**{"out": str(out), "episodes": 2, "resolution": TINY, "track_length": TRACK_LENGTH,
                           **overrides})


def without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def read_manifest(path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerloop", *args], capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- workers
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The same 2-episode recording made with 1 and with 2 worker processes."""
    root = tmp_path_factory.mktemp("record")
    summaries = {}
    for workers in (1, 2):
        summaries[workers] = record(tiny_config(root / f"w{workers}", workers=workers), progress=False)
    return root, summaries


def test_record_summary(recorded):
    root, summaries = recorded
    for workers, summary in summaries.items():
        assert summary["episodes_recorded"] == 2 and summary["episodes_total"] == 2
        assert summary["out"] == str(root / f"w{workers}")
        assert summary["frames"] == sum(e["length"] for e in read_manifest(root / f"w{workers}")["episodes"].values())


def test_worker_count_does_not_change_the_bytes(recorded):
    root, _ = recorded
    for index in range(2):
        name = episode_file(index)
        a, b = (root / "w1" / name).read_bytes(), (root / "w2" / name).read_bytes()
        assert a == b, f"{name} differs between workers=1 and workers=2"
    assert without_created(read_manifest(root / "w1")) == without_created(read_manifest(root / "w2"))


def test_ray_backend_records_the_same_bytes(recorded, ray_local):
    root, _ = recorded
    from steerloop.evaluation.cli import main

    assert main(["record", "--out", str(root / "ray"), "--episodes", "2", "--resolution", "16x32", "--track-length",
                 str(TRACK_LENGTH), "--workers", "2", "--backend", "ray", "--quiet"]) == 0
    for index in range(2):
        name = episode_file(index)
        assert (root / "w1" / name).read_bytes() == (root / "ray" / name).read_bytes(), f"{name} differs on Ray"
    assert without_created(read_manifest(root / "w1")) == without_created(read_manifest(root / "ray"))
    assert "backend" not in read_manifest(root / "ray")["config"]


def test_recording_is_valid_and_complete(recorded):
    root, _ = recorded
    assert validate(root / "w1") == []
    log = DrivingLog(root / "w1")
    assert log.episodes == [0, 1]
    manifest = log.manifest
    assert manifest["cameras"] == ["center"] and manifest["resolution"] == list(TINY)
    assert manifest["config"] == tiny_config(root / "w1").dataset_config()
    assert "workers" not in manifest["config"] and "out" not in manifest["config"]
    assert manifest["suite"] == "train" and manifest["seeds"] == {"seed": 0}
    jobs = episode_jobs(tiny_config(root / "w1"))
    for job in jobs:
        attrs = manifest["episodes"][str(job.index)]["attrs"]
        assert attrs["seed"] == job.reset_seed and attrs["noise_seed"] == job.noise_seed
        assert attrs["success"] is True and attrs["off_road"] is False
        data = log.read_episode(job.index)
        assert data["frames/center"].shape == (log.episode_length(job.index), *TINY, 3)
        # a clean expert executes its label (it reads the float32 privileged observation, the label
        # is computed from the float64 state: equal up to rounding)
        np.testing.assert_allclose(data["steering"], data["expert_steering"], atol=1e-5)
        assert np.all(np.diff(data["time"]) > 0) and np.all(np.diff(data["progress"]) > 0)
    log.close()


def test_resume_rerecords_a_same_size_corrupt_episode(recorded, tmp_path, capsys):
    """Resume used to skip any listed episode of the right size: a corrupted one stayed, the
    command reported success and the dataset did not validate."""
    root, _ = recorded
    out = tmp_path / "log"
    shutil.copytree(root / "w1", out)
    file = out / episode_file(1)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    assert validate(out) != []
    from steerloop.evaluation.cli import main

    code = main(["record", "--out", str(out), "--episodes", "2", "--resolution", "16x32", "--track-length",
                 str(TRACK_LENGTH), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"re-recorded {episode_file(1)}: sha256 mismatch (manifest " in captured.out
    assert "recorded 1 episode(s)" in captured.out
    assert validate(out) == []
    for index in range(2):  # deterministic: the re-recorded bytes are the clean recording's
        assert (out / episode_file(index)).read_bytes() == (root / "w1" / episode_file(index)).read_bytes()
    assert read_manifest(out) == read_manifest(root / "w1")  # "created" included: the manifest was only updated


# ----------------------------------------------------------------------------- episode jobs
def test_episode_jobs_are_a_pure_function_of_the_config(tmp_path):
    cfg = tiny_config(tmp_path / "a", episodes=5, conditions=("default", "dusk"))
    jobs = episode_jobs(cfg)
    assert jobs == episode_jobs(cfg)
    assert jobs == episode_jobs(dataclasses.replace(cfg, workers=2))
    assert jobs == episode_jobs(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert [j.index for j in jobs] == list(range(5))
    assert [j.condition for j in jobs] == ["default", "dusk", "default", "dusk", "default"]
    assert all(0 <= j.track < 100_000 for j in jobs)  # train split
    assert len({j.reset_seed for j in jobs}) == 5
    # the first episodes do not depend on how many are recorded
    assert episode_jobs(dataclasses.replace(cfg, episodes=3)) == jobs[:3]
    # ... but do depend on the master seed and on the split
    assert episode_jobs(dataclasses.replace(cfg, seed=1)) != jobs
    assert all(100_000 <= j.track < 200_000 for j in episode_jobs(dataclasses.replace(cfg, suite="val")))


def test_episode_jobs_on_a_track_file(tmp_path, short_spec_path):
    jobs = episode_jobs(tiny_config(tmp_path, episodes=3, track=short_spec_path))
    assert all(j.track == jobs[0].track and j.track["name"] == "short" for j in jobs)


@pytest.mark.parametrize("overrides,field", [
    ({"episodes": 0}, "episodes"), ({"suite": "holdout"}, "suite"), ({"noise": -0.1}, "noise"),
    ({"noise_kind": "pink"}, "noise_kind"), ({"conditions": ("fog",)}, "conditions"),
    ({"expert": "pid"}, "expert"), ({"workers": 0}, "workers"),
])
def test_record_config_validation(tmp_path, overrides, field):
    """The library names the config field; the command line names the flag."""
    with pytest.raises(ValueError, match=rf"^{field}(\[\d+\])?(:| must)"):
        tiny_config(tmp_path, **overrides)


def test_the_command_line_names_the_flag_for_a_config_field(tmp_path, capsys):
    from steerloop.evaluation.cli import main

    assert main(["record", "--out", str(tmp_path / "d"), "--noise", "-1", "--quiet"]) == 2
    assert "steerloop record: --noise must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- DART noise
@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("noisy") / "log", episodes=1, noise=0.2, seed=3)
    record(cfg, progress=False)
    log = DrivingLog(cfg.out)
    data = log.read_episode(0)
    attrs = log.manifest["episodes"]["0"]["attrs"]
    log.close()
    return cfg, data, attrs


def test_noise_mode_executes_noisy_commands_and_logs_clean_labels(noisy):
    cfg, data, attrs = noisy
    steering, expert = data["steering"].astype(np.float64), data["expert_steering"].astype(np.float64)
    difference = steering - expert
    assert np.mean(np.abs(difference) > 1e-6) > 0.95  # the executed command differs on (almost) every step
    assert 0.15 < np.std(difference) < 0.25  # ~ the 0.2 noise scale
    assert np.all(np.abs(expert) < 0.6), "the clean label stays in a plausible band (no noise in it)"
    # executed = clip(label + N(0, 0.2)) with the episode's noise seed: the difference *is* that noise
    noise = np.random.default_rng(attrs["noise_seed"]).normal(0.0, cfg.noise, len(steering))
    unclipped = np.abs(expert + noise) < 1.0
    np.testing.assert_allclose(difference[unclipped], noise[unclipped], atol=1e-4)


def test_noise_mode_labels_are_the_expert_command_of_the_visited_state(noisy):
    """Replay the executed commands in a fresh simulator: the expert's command for every
    visited state equals the logged label."""
    cfg, data, attrs = noisy
    (job,) = episode_jobs(cfg)
    env = LaneKeepEnv(resolution=cfg.resolution, cameras=cfg.cameras, speed=cfg.speed, expert=cfg.expert,
                      privileged=True, track_length=cfg.track_length)
    try:
        _, info = env.reset(seed=attrs["seed"], options={"track": job.track, "condition": job.condition})
        labels, offsets = [], []
        for command in data["steering"]:
            labels.append(info["expert_steering"])
            offsets.append(info["lateral_offset"])
            _, _, terminated, _, info = env.step(np.array([command], np.float32))
        assert terminated and info["success"]
    finally:
        env.close()
    np.testing.assert_allclose(data["expert_steering"], np.float32(labels), atol=1e-5)
    np.testing.assert_allclose(data["lateral_offset"], np.float32(offsets), atol=1e-5)


def test_noise_is_in_the_dataset_config(noisy):
    cfg, _, _ = noisy
    assert read_manifest(cfg.out)["config"]["noise"] == 0.2
    with pytest.raises(LogError, match="different recording"):
        record(dataclasses.replace(cfg, noise=0.0), progress=False)


# ----------------------------------------------------------------------------- crash safety (CLI)
@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """``steerloop record`` SIGKILLed after its first episode, then re-run to completion."""
    out = tmp_path_factory.mktemp("killed") / "log"
    command = [sys.executable, "-m", "steerloop", "record", "--out", str(out), *RECORD_ARGS]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        listed = 0
        while time.monotonic() < deadline and process.poll() is None:
            try:
                listed = len(read_manifest(out)["episodes"])
            except (FileNotFoundError, json.JSONDecodeError):
                listed = 0
            if listed >= 1:
                break
            time.sleep(0.02)
        assert process.poll() is None, f"record ended before it could be killed: {process.stderr.read()}"
        assert listed >= 1, "no episode was recorded in time"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    after_kill = {
        "problems": validate(out),
        "files": sorted(p.name for p in out.iterdir()),
        "completed": {int(k): e for k, e in read_manifest(out)["episodes"].items()},
    }
    after_kill["stat"] = {i: ((out / e["file"]).stat().st_mtime_ns, sha256(out / e["file"]))
                          for i, e in after_kill["completed"].items()}
    resumed = cli("record", "--out", str(out), *RECORD_ARGS)
    return out, after_kill, resumed


def test_sigkill_leaves_a_valid_dataset(killed_then_resumed):
    out, after_kill, _ = killed_then_resumed
    assert after_kill["problems"] == []
    assert 1 <= len(after_kill["completed"]) <= 3
    listed = {e["file"] for e in after_kill["completed"].values()}
    for name in after_kill["files"]:  # only listed episodes, the manifest and possibly leftover .tmp files
        assert name in listed or name == MANIFEST or name.endswith(".tmp"), name


def test_rerun_completes_the_dataset(killed_then_resumed):
    out, after_kill, resumed = killed_then_resumed
    assert resumed.returncode == 0, resumed.stderr
    missing = 3 - len(after_kill["completed"])
    assert f"recorded {missing} episode(s)" in resumed.stdout
    assert "holds 3 episode(s)" in resumed.stdout
    assert validate(out) == []
    log = DrivingLog(out)
    assert log.episodes == [0, 1, 2]
    log.close()
    assert not list(out.glob("*.tmp"))


def test_rerun_does_not_rerecord_completed_episodes(killed_then_resumed):
    out, after_kill, _ = killed_then_resumed
    manifest = read_manifest(out)
    for index, (mtime, digest) in after_kill["stat"].items():
        file = out / episode_file(index)
        assert file.stat().st_mtime_ns == mtime, f"{file.name} was rewritten"
        assert sha256(file) == digest
        assert manifest["episodes"][str(index)] == after_kill["completed"][index]


def test_killed_and_resumed_equals_uninterrupted_in_process(killed_then_resumed, tmp_path):
    """The CLI recording equals an uninterrupted recording of the same arguments."""
    out, _, _ = killed_then_resumed
    cfg = RecordConfig(out=str(tmp_path / "ref"), episodes=3, resolution=TINY, track_length=TRACK_LENGTH)
    assert read_manifest(out)["config"] == cfg.dataset_config()
    reference_jobs = episode_jobs(cfg)
    manifest = read_manifest(out)
    assert [manifest["episodes"][str(j.index)]["attrs"]["seed"] for j in reference_jobs] == \
        [j.reset_seed for j in reference_jobs]


def test_different_config_on_the_same_dir_is_refused(killed_then_resumed):
    out, _, _ = killed_then_resumed
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = cli("record", "--out", str(out), "--episodes", "3", "--resolution", "16x32", "--track-length", "60",
                 "--seed", "1", "--quiet")
    assert result.returncode != 0
    assert "different recording" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rerun_of_a_complete_dataset_records_nothing(killed_then_resumed):
    out, _, _ = killed_then_resumed
    summary = record(RecordConfig(out=str(out), episodes=3, resolution=TINY, track_length=TRACK_LENGTH),
                     progress=False)
    assert summary["episodes_recorded"] == 0 and summary["frames"] == 0


# ----------------------------------------------------------------------------- steerloop validate
def test_validate_cli_exit_codes(killed_then_resumed, tmp_path):
    out, _, _ = killed_then_resumed
    good = cli("validate", str(out))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "valid" in good.stdout

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    file = broken / episode_file(1)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    bad = cli("validate", str(broken))
    assert bad.returncode == 1
    assert episode_file(1) in bad.stdout and "sha256" in bad.stdout
    assert "1 problem(s)" in bad.stderr


def test_validate_cli_on_a_directory_without_manifest(tmp_path):
    result = cli("validate", str(tmp_path))
    assert result.returncode == 1
    assert "manifest.json is missing" in result.stdout


def test_side_camera_recording_stores_what_each_camera_saw(tmp_path, short_spec_path):
    """With three cameras the centre frame comes from the observation and the side frames
    from info["frames"]: replaying the executed commands renders exactly the logged frames."""
    cfg = tiny_config(tmp_path / "log", episodes=1, track=short_spec_path, cameras=("center", "left", "right"))
    record(cfg, progress=False)
    log = DrivingLog(cfg.out)
    data, attrs = log.read_episode(0), log.manifest["episodes"]["0"]["attrs"]
    log.close()
    (job,) = episode_jobs(cfg)
    env = LaneKeepEnv(resolution=cfg.resolution, cameras=cfg.cameras, speed=cfg.speed, expert=cfg.expert,
                      privileged=True, track_length=cfg.track_length)
    try:
        obs, info = env.reset(seed=attrs["seed"], options={"track": job.track, "condition": job.condition})
        for t, command in enumerate(data["steering"][:40]):
            np.testing.assert_array_equal(data["frames/center"][t], obs["image"], err_msg=f"center, step {t}")
            for side in ("left", "right"):
                np.testing.assert_array_equal(data[f"frames/{side}"][t], info["frames"][side], err_msg=f"{side} {t}")
            obs, _, _, _, info = env.step(np.array([command], np.float32))
    finally:
        env.close()
    assert not np.array_equal(data["frames/left"][10], data["frames/center"][10])
