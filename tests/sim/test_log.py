"""Driving logs (sim.log): lossless round trips, windows, reproducible bytes, resumption,
corruption detection and validation. Synthetic episodes only: no simulator needed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sim.log import (MANIFEST, SCHEMA_VERSION, SERIES, CorruptEpisodeError, DrivingLog, DrivingLogWriter,
                     EpisodeBuffer, LogError, episode_file, validate)

RES = (8, 12)  # (H, W) [px] of the synthetic frames
CAMERAS = ("center", "left")
CONFIG = {"what": "synthetic", "seed": 0, "resolution": list(RES)}


def make_buffer(n: int = 12, *, seed: int = 0, cameras=CAMERAS, **overrides) -> EpisodeBuffer:
    """An episode of ``n`` steps with random frames and in-range series; ``overrides`` maps a
    series name to a function (step index, default value) -> value."""
    rng = np.random.default_rng(seed)
    buffer = EpisodeBuffer(cameras)
    for t in range(n):
        frames = {c: rng.integers(0, 256, (*RES, 3), dtype=np.uint8) for c in cameras}
        values = {
            "steering": float(rng.uniform(-1, 1)), "expert_steering": float(rng.uniform(-1, 1)),
            "speed": float(rng.uniform(9, 11)), "throttle": float(rng.uniform(-1, 1)),
            "x": float(rng.normal() * 100), "y": float(rng.normal() * 100), "yaw": float(rng.uniform(-3, 3)),
            "lateral_offset": float(rng.normal() * 0.2), "heading_error": float(rng.normal() * 0.05),
            "progress": 0.5 * t + float(rng.uniform(0, 0.1)), "curvature": float(rng.normal() * 0.01),
            "time": 0.05 * (t + 1), "wheel_angle": float(rng.uniform(-0.5, 0.5)),
            "perturbation_phase": int(rng.integers(0, 3)),
        }
        for name, fn in overrides.items():
            values[name] = fn(t, values[name])
        buffer.append(frames, **values)
    return buffer


def write_dataset(path, buffers, config=CONFIG, cameras=CAMERAS) -> DrivingLogWriter:
    writer = DrivingLogWriter(path, config=config, cameras=cameras, resolution=RES, suite="train",
                              seeds={"seed": 0})
    for index, buffer in enumerate(buffers):
        writer.write_episode(index, buffer, {"episode": index, "note": "synthetic"})
    return writer


def snapshot(path) -> dict:
    """Every file of a directory -> its bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


@pytest.fixture
def dataset(tmp_path):
    """A valid 2-episode dataset (lengths 12 and 9) and the buffers it was written from."""
    buffers = [make_buffer(12, seed=1), make_buffer(9, seed=2)]
    write_dataset(tmp_path / "log", buffers)
    return tmp_path / "log", buffers


def flip_byte(path, position=None) -> None:
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if position is None else position
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- round trip
def test_round_trip_is_bit_for_bit(dataset):
    path, buffers = dataset
    log = DrivingLog(path)
    assert log.episodes == [0, 1] and len(log) == 2
    for index, buffer in enumerate(buffers):
        expected = buffer.arrays()
        got = log.read_episode(index)
        assert set(got) == set(expected) == set(SERIES) | {f"frames/{c}" for c in CAMERAS}
        for key, value in expected.items():
            assert got[key].dtype == value.dtype, key
            assert got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        assert got["frames/center"].shape == (len(buffer), *RES, 3)
        assert log.episode_length(index) == len(buffer)
    log.close()


def test_series_are_stored_with_the_documented_dtypes(dataset):
    path, _ = dataset
    log = DrivingLog(path)
    data = log.read_episode(0)
    for name, spec in SERIES.items():
        assert data[name].dtype == np.dtype(spec.dtype), name
    assert log.manifest["schema_version"] == SCHEMA_VERSION
    assert log.manifest["cameras"] == list(CAMERAS) and log.manifest["resolution"] == list(RES)
    assert log.manifest["episodes"]["0"]["length"] == 12
    assert log.manifest["episodes"]["0"]["attrs"] == {"episode": 0, "note": "synthetic"}
    log.close()


def test_read_episode_of_one_camera(dataset):
    path, buffers = dataset
    log = DrivingLog(path)
    got = log.read_episode(1, cameras=["left"])
    assert "frames/left" in got and "frames/center" not in got
    np.testing.assert_array_equal(got["frames/left"], buffers[1].arrays()["frames/left"])
    log.close()


def test_read_window_equals_slice_of_episode(dataset):
    path, _ = dataset
    log = DrivingLog(path)
    full = log.read_episode(0)
    for start, T in [(0, 1), (3, 4), (8, 4), (0, 12)]:
        window = log.read_window(0, start, T)
        assert set(window) == set(full)
        for key in full:
            np.testing.assert_array_equal(window[key], full[key][start:start + T], err_msg=f"{key} {start} {T}")
    log.close()


@pytest.mark.parametrize("start,T", [(9, 4), (12, 1), (-1, 2), (0, 13), (0, 0)])
def test_read_window_out_of_range_raises_index_error(dataset, start, T):
    path, _ = dataset
    log = DrivingLog(path)
    with pytest.raises(IndexError, match="outside episode 0"):
        log.read_window(0, start, T)
    log.close()


def test_unknown_episode_raises_index_error(dataset):
    path, _ = dataset
    log = DrivingLog(path)
    with pytest.raises(IndexError):
        log.read_episode(5)
    log.close()


def test_buffer_refuses_incomplete_steps():
    buffer = EpisodeBuffer(("center",))
    with pytest.raises(KeyError, match="missing"):
        buffer.append({}, **{name: 0.0 for name in SERIES})
    with pytest.raises(KeyError, match="steering"):
        buffer.append({"center": np.zeros((*RES, 3), np.uint8)}, speed=1.0)
    assert len(buffer) == 0


def test_empty_episode_is_refused(tmp_path):
    writer = DrivingLogWriter(tmp_path / "log", config=CONFIG, cameras=CAMERAS, resolution=RES)
    with pytest.raises(LogError, match="no steps"):
        writer.write_episode(0, EpisodeBuffer(CAMERAS), {})


# ----------------------------------------------------------------------------- reproducibility
def test_identical_content_gives_identical_bytes_and_manifest(tmp_path):
    buffers = [make_buffer(10, seed=3), make_buffer(7, seed=4)]
    write_dataset(tmp_path / "a", buffers)
    write_dataset(tmp_path / "b", [make_buffer(10, seed=3), make_buffer(7, seed=4)])
    for index in range(2):
        name = episode_file(index)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest_a = json.loads((tmp_path / "a" / MANIFEST).read_text())
    manifest_b = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert manifest_a["episodes"]["0"]["sha256"] == manifest_b["episodes"]["0"]["sha256"]
    assert manifest_a["episodes"]["1"]["sha256"] == manifest_b["episodes"]["1"]["sha256"]
    assert without_created(manifest_a) == without_created(manifest_b)


def test_different_content_gives_different_checksums(tmp_path):
    write_dataset(tmp_path / "a", [make_buffer(10, seed=3)])
    write_dataset(tmp_path / "b", [make_buffer(10, seed=5)])
    sha_a = json.loads((tmp_path / "a" / MANIFEST).read_text())["episodes"]["0"]["sha256"]
    sha_b = json.loads((tmp_path / "b" / MANIFEST).read_text())["episodes"]["0"]["sha256"]
    assert sha_a != sha_b


# ----------------------------------------------------------------------------- resumption
def test_resume_with_same_config_reports_completed_episodes(dataset):
    path, _ = dataset
    before = snapshot(path)
    writer = DrivingLogWriter(path, config=dict(CONFIG), cameras=CAMERAS, resolution=RES)
    assert writer.completed() == {0, 1}
    assert snapshot(path) == before  # opening for resumption changes nothing


def test_resume_appends_new_episodes(dataset):
    path, buffers = dataset
    writer = DrivingLogWriter(path, config=CONFIG, cameras=CAMERAS, resolution=RES)
    writer.write_episode(2, make_buffer(5, seed=9), {"episode": 2})
    log = DrivingLog(path)
    assert log.episodes == [0, 1, 2]
    np.testing.assert_array_equal(log.read_episode(0)["steering"], buffers[0].arrays()["steering"])
    assert validate(path) == []
    log.close()


def test_resume_with_a_different_config_is_refused_and_changes_nothing(dataset):
    path, _ = dataset
    before = snapshot(path)
    with pytest.raises(LogError, match="different recording") as error:
        DrivingLogWriter(path, config={**CONFIG, "seed": 1}, cameras=CAMERAS, resolution=RES)
    assert str(path) in str(error.value)
    assert snapshot(path) == before


def test_resume_removes_stale_tmp_files(dataset):
    path, _ = dataset
    stale = path / (episode_file(2) + ".tmp")
    stale.write_bytes(b"half-written episode")
    assert validate(path) == []  # a leftover .tmp is not a problem of the dataset
    writer = DrivingLogWriter(path, config=CONFIG, cameras=CAMERAS, resolution=RES)
    assert not stale.exists()
    assert writer.completed() == {0, 1}


def test_completed_ignores_episodes_whose_file_is_missing(dataset):
    path, _ = dataset
    (path / episode_file(1)).unlink()
    writer = DrivingLogWriter(path, config=CONFIG, cameras=CAMERAS, resolution=RES)
    assert writer.completed() == {0}


# ----------------------------------------------------------------------------- corruption
def _assert_corruption_detected(path, index: int = 1) -> None:
    name = episode_file(index)
    problems = validate(path)
    assert problems, "validate() found nothing"
    assert any(line.startswith(name) for line in problems), problems
    with pytest.raises(CorruptEpisodeError, match=name):
        DrivingLog(path).verify(index)
    DrivingLog(path).verify(1 - index)  # the other episode is fine
    log = DrivingLog(path, skip_corrupt=True)
    assert [i for i, _ in log.skipped] == [index]
    assert log.episodes == [1 - index]
    assert name in log.skipped[0][1]
    log.read_episode(1 - index)  # the intact episode stays readable
    log.close()


def test_flipped_byte_is_detected(dataset):
    path, _ = dataset
    flip_byte(path / episode_file(1))
    _assert_corruption_detected(path, 1)


def test_flipped_byte_in_first_episode_is_detected(dataset):
    path, _ = dataset
    flip_byte(path / episode_file(0), position=-10)
    _assert_corruption_detected(path, 0)


def test_truncated_file_is_detected(dataset):
    path, _ = dataset
    file = path / episode_file(1)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _assert_corruption_detected(path, 1)


def test_missing_episode_file_is_detected(dataset):
    path, _ = dataset
    (path / episode_file(1)).unlink()
    problems = validate(path)
    assert any(line.startswith(episode_file(1)) and "missing" in line for line in problems), problems
    log = DrivingLog(path, skip_corrupt=True)
    assert [i for i, _ in log.skipped] == [1] and log.episodes == [0]
    log.close()


def test_truncated_file_read_without_verification_raises_corrupt_error(dataset):
    path, _ = dataset
    file = path / episode_file(1)
    file.write_bytes(file.read_bytes()[:200])
    log = DrivingLog(path)  # no verification when skip_corrupt is off
    with pytest.raises(CorruptEpisodeError, match=episode_file(1)):
        log.read_episode(1)
    log.close()


# ----------------------------------------------------------------------------- schema versions
def test_newer_major_schema_version_is_refused(dataset):
    path, _ = dataset
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["schema_version"] = "2.0.0"
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LogError) as error:
        DrivingLog(path)
    assert "2.0.0" in str(error.value) and SCHEMA_VERSION in str(error.value)
    problems = validate(path)
    assert len(problems) == 1 and SCHEMA_VERSION in problems[0]


def test_missing_or_unreadable_manifest_is_a_log_error(tmp_path):
    with pytest.raises(LogError, match="manifest.json is missing"):
        DrivingLog(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(LogError, match="not valid JSON"):
        DrivingLog(tmp_path)
    assert len(validate(tmp_path)) == 1


def test_resume_on_unreadable_manifest_is_a_log_error(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(LogError, match="unreadable manifest"):
        DrivingLogWriter(tmp_path, config=CONFIG, cameras=CAMERAS, resolution=RES)
    assert (tmp_path / MANIFEST).read_text() == "{not json"


# ----------------------------------------------------------------------------- validation
def test_valid_dataset_has_no_problems(dataset):
    path, _ = dataset
    assert validate(path) == []


def test_validate_catches_steering_out_of_range(tmp_path):
    bad = make_buffer(10, seed=1, steering=lambda t, v: 1.5 if t == 4 else v)
    write_dataset(tmp_path / "log", [make_buffer(6, seed=0), bad])
    problems = validate(tmp_path / "log")
    prefix = f"{episode_file(1)} (episode 1): steering "
    assert any(line.startswith(prefix) and "1 values outside" in line for line in problems), problems
    assert not any(line.startswith(episode_file(0)) for line in problems), problems
    assert len(problems) == 1, problems


def test_validate_catches_non_finite_values(tmp_path):
    bad = make_buffer(10, seed=1, lateral_offset=lambda t, v: float("nan") if t in (2, 3) else v,
                      x=lambda t, v: float("inf") if t == 7 else v)
    write_dataset(tmp_path / "log", [bad])
    problems = validate(tmp_path / "log")
    assert any(line.startswith(f"{episode_file(0)} (episode 0): lateral_offset has 2 non-finite")
               for line in problems), problems
    assert any(line.startswith(f"{episode_file(0)} (episode 0): x has 1 non-finite") for line in problems), problems


def test_validate_catches_other_range_violations(tmp_path):
    bad = make_buffer(8, seed=1, speed=lambda t, v: 75.0 if t == 0 else v,
                      perturbation_phase=lambda t, v: 3 if t == 1 else v)
    write_dataset(tmp_path / "log", [bad])
    problems = validate(tmp_path / "log")
    assert any(": speed has 1 values outside" in line for line in problems), problems
    assert any(": perturbation_phase has 1 values outside" in line for line in problems), problems


def test_validate_catches_wrong_frame_shape(tmp_path):
    writer = DrivingLogWriter(tmp_path / "log", config=CONFIG, cameras=CAMERAS, resolution=(RES[0] + 1, RES[1]))
    writer.write_episode(0, make_buffer(4), {})
    problems = validate(tmp_path / "log")
    assert any("frames/center" in line and "expected uint8" in line for line in problems), problems


def test_validate_reports_stray_episode_file(dataset):
    path, _ = dataset
    shutil.copy(path / episode_file(0), path / episode_file(7))
    problems = validate(path)
    assert any(line.startswith(episode_file(7)) and "not listed in the manifest" in line for line in problems), \
        problems
    assert len(problems) == 1, problems
