"""Driving logs (steerloop.driving_log): lossless round trips, windows, byte-reproducible files, resumption,
crash safety, corruption detection and validation. Synthetic episodes only: no simulator needed."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import steerloop.driving_log.integrity as log_module
from steerloop.driving_log.integrity import RACY_WINDOW_NS
from steerloop.driving_log import (FRAME_COMPRESSION, FRAME_COMPRESSION_LEVEL, MANIFEST, SCALAR_FIELDS,
                               SCHEMA_VERSION, CorruptEpisodeError, DrivingLog, DrivingLogWriter, EpisodeBuffer,
                               LogError, episode_file, validate)

ROOT = Path(__file__).resolve().parents[2]
RES = (8, 16)  # (H, W) [px] of the synthetic frames
CAMERAS = ("center", "left")
CONFIG = {"what": "synthetic", "seed": 0, "noise": 0.1, "cameras": list(CAMERAS)}


def road_frame(t: int, camera: int) -> np.ndarray:
    """A tiny road-like RGB frame: sky, grass, a shifting grey road and a lane line."""
    frame = np.empty((*RES, 3), np.uint8)
    frame[:3] = (135, 180, 230)
    frame[3:] = (70, 120, 60)
    left = 3 + (t + camera) % 5
    frame[3:, left:left + 8] = (90, 90, 95)
    frame[3:, left + 4] = (240, 240, 240)
    return frame


def make_buffer(n: int = 12, *, seed: int = 0, cameras=CAMERAS) -> EpisodeBuffer:
    """An episode of ``n`` steps with in-range series (content determined by ``seed``)."""
    rng = np.random.default_rng(seed)
    buffer = EpisodeBuffer(cameras)
    for t in range(n):
        frames = {c: road_frame(t + seed, i) for i, c in enumerate(cameras)}
        frames[cameras[0]][0, 0] = rng.integers(0, 256, 3)  # content differs between seeds
        buffer.append(
            frames,
            steering=float(rng.uniform(-1, 1)), expert_steering=float(rng.uniform(-1, 1)),
            speed=float(rng.uniform(9, 11)), throttle=float(rng.uniform(-1, 1)),
            x=float(rng.normal() * 100), y=float(rng.normal() * 100), yaw=float(rng.uniform(-3, 3)),
            lateral_offset=float(rng.normal() * 0.2), heading_error=float(rng.normal() * 0.05),
            progress=0.5 * t, curvature=float(rng.normal() * 0.01), time=0.05 * t,
            wheel_angle=float(rng.uniform(-0.5, 0.5)), perturbation_phase=int(rng.integers(0, 3)),
        )
    return buffer


def attrs_for(index: int) -> dict:
    return {"episode": index, "track": {"name": "short", "lane_width": 3.7}, "seed": 100 + index,
            "condition": "default", "noise_seed": 7}


def open_writer(path, config=CONFIG, cameras=CAMERAS, **kwargs) -> DrivingLogWriter:
    return DrivingLogWriter(path, config=config, cameras=cameras, resolution=RES, suite="train",
                            seeds={"seed": 0}, **kwargs)


def write_dataset(path, buffers) -> DrivingLogWriter:
    writer = open_writer(path)
    for index, buffer in enumerate(buffers):
        writer.write_episode(index, buffer, attrs_for(index))
    return writer


def snapshot(path) -> dict:
    """Every file of a directory -> its bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


def read_manifest(path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def flip_byte(path: Path, position: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if position is None else position] ^= 0xFF
    path.write_bytes(bytes(data))


def tamper(path: Path, index: int, edit) -> None:
    """Apply ``edit(h5py.File)`` to an episode and re-sign it in the manifest, so that only the
    content checks of validate() can notice."""
    file = path / episode_file(index)
    with h5py.File(file, "r+") as fh:
        edit(fh)
    manifest = read_manifest(path)
    entry = manifest["episodes"][str(index)]
    entry["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    entry["bytes"] = file.stat().st_size
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def dataset(tmp_path):
    """A valid 2-episode dataset (lengths 12 and 9) and the buffers it was written from."""
    buffers = [make_buffer(12, seed=1), make_buffer(9, seed=2)]
    write_dataset(tmp_path / "log", buffers)
    return tmp_path / "log", buffers


# ----------------------------------------------------------------------------- round trip
def test_round_trip_is_bit_for_bit(dataset):
    path, buffers = dataset
    with DrivingLog(path) as log:
        assert log.episodes == [0, 1] and len(log) == 2 and log.total_steps == 21
        for index, buffer in enumerate(buffers):
            expected = buffer.arrays()
            got = log.read_episode(index)
            assert set(got) == set(expected) == set(SCALAR_FIELDS) | {f"frames/{c}" for c in CAMERAS}
            for key, value in expected.items():
                assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
                np.testing.assert_array_equal(got[key], value, err_msg=key)
            assert log.episode_length(index) == len(buffer)
            assert log.episode_attrs(index) == attrs_for(index)


def test_file_follows_the_documented_schema(dataset):
    path, _ = dataset
    with h5py.File(path / episode_file(1), "r") as fh:  # plain h5py, no steerloop
        assert fh.attrs["schema_version"] == SCHEMA_VERSION and fh.attrs["episode"] == 1
        assert fh.attrs["seed"] == 101 and fh.attrs["condition"] == "default"
        assert json.loads(fh.attrs["track"]) == {"name": "short", "lane_width": 3.7}
        for name, spec in SCALAR_FIELDS.items():
            assert fh[name].dtype == np.dtype(spec.dtype) and fh[name].shape == (9,), name
            assert fh[name].attrs["unit"] == spec.unit
        for camera in CAMERAS:
            ds = fh[f"frames/{camera}"]
            assert ds.dtype == np.uint8 and ds.shape == (9, *RES, 3)
            assert ds.chunks == (1, *RES, 3)
            assert ds.compression == FRAME_COMPRESSION and ds.compression_opts == FRAME_COMPRESSION_LEVEL
    manifest = read_manifest(path)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["config"] == CONFIG
    assert manifest["cameras"] == list(CAMERAS) and manifest["resolution"] == list(RES)
    assert manifest["suite"] == "train" and manifest["seeds"] == {"seed": 0}
    assert set(manifest["software"]) >= {"python", "numpy", "h5py", "steerloop"}
    assert manifest["bytes_per_frame"] > 0
    entry = manifest["episodes"]["1"]
    assert entry["file"] == episode_file(1) and entry["length"] == 9
    assert entry["bytes"] == (path / episode_file(1)).stat().st_size
    assert entry["sha256"] == hashlib.sha256((path / episode_file(1)).read_bytes()).hexdigest()
    assert (path / MANIFEST).read_text() == json.dumps(manifest, sort_keys=True, indent=2) + "\n"


def test_read_episode_of_some_cameras(dataset):
    path, buffers = dataset
    with DrivingLog(path) as log:
        got = log.read_episode(1, cameras=["left"])
        assert "frames/left" in got and "frames/center" not in got
        np.testing.assert_array_equal(got["frames/left"], buffers[1].arrays()["frames/left"])
        assert not any(key.startswith("frames/") for key in log.read_episode(1, cameras=[]))
        with pytest.raises(KeyError, match="right"):
            log.read_episode(1, cameras=["right"])


def test_read_window_equals_slice_of_episode(dataset):
    path, _ = dataset
    with DrivingLog(path) as log:
        full = log.read_episode(0)
        for start, T in [(0, 1), (3, 4), (8, 4), (0, 12), (11, 1)]:
            window = log.read_window(0, start, T)
            assert set(window) == set(full)
            for key in full:
                np.testing.assert_array_equal(window[key], full[key][start:start + T], err_msg=f"{key} {start} {T}")
        assert set(log.read_window(1, 2, 3, cameras=["center"])) == set(SCALAR_FIELDS) | {"frames/center"}


@pytest.mark.parametrize("start,T", [(9, 4), (12, 1), (-1, 2), (0, 13), (0, 0)])
def test_read_window_out_of_range_raises_index_error(dataset, start, T):
    path, _ = dataset
    with DrivingLog(path) as log, pytest.raises(IndexError, match=f"{episode_file(0)} with 12 steps"):
        log.read_window(0, start, T)


def test_unknown_episode_raises_index_error(dataset):
    path, _ = dataset
    with DrivingLog(path) as log, pytest.raises(IndexError, match="episode 5"):
        log.read_episode(5)


def test_reader_survives_fork_and_pickle(dataset):
    path, _ = dataset
    log = DrivingLog(path)
    expected = log.read_window(0, 2, 5)  # opens and caches a handle in the parent
    pid = os.fork()
    if pid == 0:  # child: must reopen its own handle, never use the parent's
        code = 1
        try:
            window = log.read_window(0, 2, 5)
            same = all(np.array_equal(window[k], expected[k]) for k in expected)
            code = 0 if same and log._pid == os.getpid() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    clone = pickle.loads(pickle.dumps(log))
    np.testing.assert_array_equal(clone.read_window(0, 2, 5)["frames/left"], expected["frames/left"])
    np.testing.assert_array_equal(log.read_window(0, 2, 5)["steering"], expected["steering"])
    clone.close()
    log.close()


# ----------------------------------------------------------------------------- writer input checks
def test_buffer_refuses_malformed_steps():
    buffer = EpisodeBuffer(("center",))
    good = {name: 0.0 for name in SCALAR_FIELDS}
    frame = np.zeros((*RES, 3), np.uint8)
    with pytest.raises(ValueError, match="frames given for cameras"):
        buffer.append({}, **good)
    with pytest.raises(ValueError, match="missing .*'throttle'"):
        buffer.append({"center": frame}, **{k: v for k, v in good.items() if k != "throttle"})
    with pytest.raises(ValueError, match="center.*float32"):
        buffer.append({"center": frame.astype(np.float32)}, **good)
    with pytest.raises(ValueError, match="speed must be a real number"):
        buffer.append({"center": frame}, **{**good, "speed": True})
    buffer.append({"center": frame}, **good)
    with pytest.raises(ValueError, match="one resolution"):
        buffer.append({"center": np.zeros((4, 4, 3), np.uint8)}, **good)
    assert len(buffer) == 1 and buffer.resolution == RES


def test_writer_refuses_invalid_episodes(tmp_path):
    writer = open_writer(tmp_path / "log")
    with pytest.raises(ValueError, match="empty"):
        writer.write_episode(0, EpisodeBuffer(CAMERAS), attrs_for(0))
    with pytest.raises(ValueError, match="missing \\['condition'\\]"):
        writer.write_episode(0, make_buffer(3), {"track": "a", "seed": 1})
    with pytest.raises(ValueError, match="attrs\\['episode'\\] is 4"):
        writer.write_episode(0, make_buffer(3), attrs_for(4))
    bad = make_buffer(3)
    bad._scalars["steering"][1] = 1.5
    bad._scalars["lateral_offset"][2] = float("nan")
    with pytest.raises(ValueError, match=f"{episode_file(0)}.*steering has 1 values outside .*lateral_offset"):
        writer.write_episode(0, bad, attrs_for(0))
    with pytest.raises(ValueError, match="buffer records cameras \\['center'\\]"):
        writer.write_episode(0, make_buffer(3, cameras=CAMERAS[:1]), attrs_for(0))
    other = DrivingLogWriter(tmp_path / "other", config=CONFIG, cameras=CAMERAS, resolution=(RES[0] + 1, RES[1]))
    with pytest.raises(ValueError, match="created with resolution"):
        other.write_episode(0, make_buffer(3), attrs_for(0))
    assert sorted(os.listdir(tmp_path / "log")) == [MANIFEST]  # nothing half-written
    writer.write_episode(0, make_buffer(3), attrs_for(0))
    with pytest.raises(LogError, match="already complete"):
        writer.write_episode(0, make_buffer(3), attrs_for(0))


# ----------------------------------------------------------------------------- reproducibility
def test_identical_content_gives_identical_bytes_and_manifest(tmp_path):
    write_dataset(tmp_path / "a", [make_buffer(10, seed=3), make_buffer(7, seed=4)])
    write_dataset(tmp_path / "b", [make_buffer(10, seed=3), make_buffer(7, seed=4)])
    for index in range(2):
        name = episode_file(index)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert without_created(read_manifest(tmp_path / "a")) == without_created(read_manifest(tmp_path / "b"))


def test_write_order_does_not_change_the_dataset(tmp_path):
    """As with several recording workers: episodes finishing out of order give the same files."""
    buffers = [make_buffer(6, seed=s) for s in range(3)]
    write_dataset(tmp_path / "a", buffers)
    writer = open_writer(tmp_path / "b")
    for index in (2, 0, 1):
        writer.write_episode(index, buffers[index], attrs_for(index))
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert {k: v for k, v in a.items() if k != MANIFEST} == {k: v for k, v in b.items() if k != MANIFEST}
    assert without_created(read_manifest(tmp_path / "a")) == without_created(read_manifest(tmp_path / "b"))


def test_different_content_gives_different_checksums(tmp_path):
    write_dataset(tmp_path / "a", [make_buffer(10, seed=3)])
    write_dataset(tmp_path / "b", [make_buffer(10, seed=5)])
    assert read_manifest(tmp_path / "a")["episodes"]["0"]["sha256"] != \
        read_manifest(tmp_path / "b")["episodes"]["0"]["sha256"]


def _write_from_process(path: str, start: int) -> None:
    writer = open_writer(path)
    for index in range(start, 6, 2):
        writer.write_episode(index, make_buffer(4, seed=index), attrs_for(index))


def test_concurrent_writers_share_one_directory(tmp_path):
    out = str(tmp_path / "log")
    open_writer(out)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_from_process, args=(out, start)) for start in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert sorted(int(k) for k in read_manifest(out)["episodes"]) == list(range(6))
    assert validate(out) == []
    _write_from_process(str(tmp_path / "serial"), 0)
    _write_from_process(str(tmp_path / "serial"), 1)
    assert without_created(read_manifest(out)) == without_created(read_manifest(tmp_path / "serial"))


# ----------------------------------------------------------------------------- resumption
def test_resume_reports_completed_episodes_and_changes_nothing(dataset):
    path, _ = dataset
    before = snapshot(path)
    writer = open_writer(path, config=json.loads(json.dumps(CONFIG)))
    assert writer.completed() == {0, 1}
    assert snapshot(path) == before  # opening for resumption writes nothing


def test_resume_appends_and_keeps_created(dataset):
    path, buffers = dataset
    created = read_manifest(path)["created"]
    open_writer(path).write_episode(2, make_buffer(5, seed=9), attrs_for(2))
    assert read_manifest(path)["created"] == created
    with DrivingLog(path) as log:
        assert log.episodes == [0, 1, 2]
        np.testing.assert_array_equal(log.read_episode(0)["steering"], buffers[0].arrays()["steering"])
    assert validate(path) == []


def test_completed_excludes_missing_files(dataset):
    path, _ = dataset
    (path / episode_file(1)).unlink()
    assert open_writer(path).completed() == {0}


def test_a_same_size_corrupt_episode_is_not_completed_and_is_rewritten(dataset):
    """Resume used to trust the file size: a corrupted episode of the right size counted as done."""
    path, buffers = dataset
    before = (path / episode_file(1)).read_bytes()
    flip_byte(path / episode_file(1))
    writer = open_writer(path)
    assert writer.completed() == {0}
    (problem,) = writer.damaged().values()
    assert list(writer.damaged()) == [1] and problem.startswith("sha256 mismatch")
    writer.write_episode(1, buffers[1], attrs_for(1))  # no "already complete" refusal
    assert (path / episode_file(1)).read_bytes() == before and validate(path) == []
    assert writer.completed() == {0, 1} and writer.damaged() == {}


@pytest.mark.parametrize("change", ["config", "cameras"])
def test_resume_with_a_different_recording_is_refused_and_changes_nothing(dataset, change):
    path, _ = dataset
    before = snapshot(path)
    kwargs = {"config": {**CONFIG, "noise": 0.2}} if change == "config" else {"cameras": ("center",)}
    with pytest.raises(LogError, match="different recording") as error:
        open_writer(path, **kwargs)
    message = str(error.value)
    assert str(path) in message and "--out" in message and "Nothing was changed" in message
    assert ("noise" in message) if change == "config" else ("cameras" in message)
    assert snapshot(path) == before


def test_overwrite_mismatch_starts_a_new_recording(dataset):
    path, _ = dataset
    (path / "notes.txt").write_text("mine")
    writer = open_writer(path, config={**CONFIG, "noise": 0.2}, overwrite_mismatch=True)
    assert writer.completed() == set()
    assert sorted(os.listdir(path)) == [MANIFEST, "notes.txt"]
    assert read_manifest(path)["config"]["noise"] == 0.2


def test_non_empty_directory_without_manifest_is_refused(tmp_path):
    (tmp_path / "thesis.pdf").write_bytes(b"%PDF")
    with pytest.raises(LogError, match="not empty .*thesis.pdf.*another --out"):
        open_writer(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["thesis.pdf"]


def test_stale_tmp_is_a_note_and_removed_on_open(dataset):
    path, _ = dataset
    stale = path / (episode_file(2) + ".tmp")
    stale.write_bytes(b"half-written episode")
    notes: list[str] = []
    assert validate(path, notes=notes) == []
    assert notes == [f"{stale.name}: incomplete episode in flight, will be re-recorded"]
    with DrivingLog(path) as log:
        assert log.episodes == [0, 1]
    assert open_writer(path).completed() == {0, 1}
    assert not stale.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="advisory locks are POSIX only")
def test_tmp_of_a_live_writer_is_not_removed(dataset):
    import fcntl

    path, _ = dataset
    live = path / (episode_file(2) + ".tmp")
    with open(live, "wb") as fh:  # another writer is in the middle of episode 2
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        open_writer(path)
        assert live.exists()
    open_writer(path)  # lock released: now it is stale
    assert not live.exists()


# ----------------------------------------------------------------------------- corruption
def _assert_corruption_detected(path: Path, index: int) -> None:
    name = episode_file(index)
    problems = validate(path)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: "), problems
    with DrivingLog(path) as log:
        with pytest.raises(CorruptEpisodeError, match=name):
            log.verify(index)
        log.verify(1 - index)  # the other episode is fine
    with DrivingLog(path, skip_corrupt=True) as log:
        assert [i for i, _ in log.skipped] == [index] and name in log.skipped[0][1]
        assert log.episodes == [1 - index] and len(log) == 1
        log.read_episode(1 - index)  # the intact episode stays readable
        with pytest.raises(CorruptEpisodeError, match="skipped"):
            log.read_episode(index)


@pytest.mark.parametrize("index,position", [(1, None), (0, -10), (0, 300)])
def test_flipped_byte_is_detected(dataset, index, position):
    path, _ = dataset
    flip_byte(path / episode_file(index), position)
    _assert_corruption_detected(path, index)
    assert "sha256" in validate(path)[0]


def test_truncated_file_is_detected(dataset):
    path, _ = dataset
    file = path / episode_file(1)
    file.write_bytes(file.read_bytes()[:400])
    _assert_corruption_detected(path, 1)
    assert "truncated" in validate(path)[0]
    with DrivingLog(path) as log, pytest.raises(CorruptEpisodeError, match=f"{episode_file(1)}.*re-record"):
        log.read_episode(1)  # no verification when skip_corrupt is off: caught on open


# ----------------------------------------------------------------------------- verification cache
@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Records every file the driving log hashes to check a checksum."""
    calls = []
    real = log_module._sha256_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(log_module, "_sha256_file", counting)
    return calls


def age(path: Path, seconds: float = 60.0) -> None:
    """Set every episode file's mtime ``seconds`` in the past (beyond the racy-timestamp window)."""
    past = time.time_ns() - int(seconds * 1e9)
    for file in path.glob("episode_*.h5"):
        os.utime(file, ns=(past, past))


def test_verify_at_open_checks_every_episode_once_per_unchanged_file(dataset, hashes):
    path, _ = dataset
    age(path)
    with DrivingLog(path, verify=True) as log:
        assert log.episodes == [0, 1]
    assert sorted(hashes) == [episode_file(0), episode_file(1)]
    for _ in range(3):  # e.g. every DAgger iteration re-reads the same datasets
        DrivingLog(path, verify=True).close()
        assert open_writer(path).completed() == {0, 1}
    assert len(hashes) == 2, "an unchanged, verified file was hashed again"


def test_the_cache_is_invalidated_when_a_file_changes_at_the_same_size(dataset, hashes):
    path, _ = dataset
    age(path)
    DrivingLog(path, verify=True).close()
    file = path / episode_file(1)
    size, mtime = file.stat().st_size, file.stat().st_mtime_ns
    flip_byte(file)
    os.utime(file, ns=(mtime + 10**9, mtime + 10**9))  # same size, a new mtime (still in the past)
    assert file.stat().st_size == size
    with pytest.raises(CorruptEpisodeError) as error:
        DrivingLog(path, verify=True)
    message = str(error.value)
    assert message.startswith(f"{file}: sha256 mismatch") and "\n" not in message
    assert f"steerloop validate {path}" in message and "re-record" in message
    assert hashes == [episode_file(0), episode_file(1), episode_file(1)]  # only the changed file again
    with pytest.raises(CorruptEpisodeError):  # a failure is never cached
        DrivingLog(path, verify=True)
    assert len(hashes) == 4


def test_a_just_written_file_is_hashed_at_every_use(dataset, hashes):
    """Timestamps are coarse: a file modified within RACY_WINDOW_NS could change again without
    a new mtime, so its check is not remembered."""
    path, _ = dataset
    assert time.time_ns() - (path / episode_file(0)).stat().st_mtime_ns < RACY_WINDOW_NS
    for _ in range(2):
        DrivingLog(path, verify=True).close()
    assert sorted(hashes) == sorted([episode_file(0), episode_file(1)] * 2)


def test_missing_episode_file_is_detected(dataset):
    path, _ = dataset
    (path / episode_file(1)).unlink()
    assert validate(path) == [f"{episode_file(1)}: listed in {MANIFEST} but missing; "
                              "re-run the recorder on this directory to re-record it"]
    with pytest.raises(LogError, match=f"{episode_file(1)} is listed .* but missing"):
        DrivingLog(path)
    with DrivingLog(path, skip_corrupt=True) as log:
        assert [i for i, _ in log.skipped] == [1] and log.episodes == [0]


# ----------------------------------------------------------------------------- schema versions, manifest
def test_newer_major_schema_version_is_refused(dataset):
    path, _ = dataset
    manifest = read_manifest(path)
    manifest["schema_version"] = "2.0.0"
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LogError) as error:
        DrivingLog(path)
    assert "2.0.0" in str(error.value) and SCHEMA_VERSION in str(error.value) and "upgrade" in str(error.value)
    with pytest.raises(LogError, match=SCHEMA_VERSION):
        open_writer(path)
    problems = validate(path)
    assert len(problems) == 1 and SCHEMA_VERSION in problems[0]


def test_newer_minor_schema_version_is_read(dataset):
    path, _ = dataset
    manifest = read_manifest(path)
    manifest["schema_version"] = "1.7.0"
    (path / MANIFEST).write_text(json.dumps(manifest))
    with DrivingLog(path) as log:
        assert log.episodes == [0, 1]


def test_missing_or_unreadable_manifest_is_a_log_error(tmp_path):
    with pytest.raises(LogError, match=f"{MANIFEST} is missing"):
        DrivingLog(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(LogError, match=f"{MANIFEST} is not valid JSON \\(Expecting property name"):
        DrivingLog(tmp_path)
    with pytest.raises(LogError, match="not valid JSON"):
        open_writer(tmp_path)
    assert (tmp_path / MANIFEST).read_text() == "{not json"
    assert len(validate(tmp_path)) == 1


# ----------------------------------------------------------------------------- validation
def test_valid_dataset_has_no_problems(dataset):
    path, _ = dataset
    notes: list[str] = []
    assert validate(path, notes=notes) == [] and notes == []


def test_validate_reports_content_problems_per_file_and_field(dataset):
    path, _ = dataset

    def edit(fh):
        steering = fh["steering"][()]
        steering[[2, 5]] = [1.5, -3.0]
        fh["steering"][...] = steering
        offset = fh["lateral_offset"][()]
        offset[0] = np.nan
        fh["lateral_offset"][...] = offset
        phase = fh["perturbation_phase"][()]
        phase[1] = 3
        fh["perturbation_phase"][...] = phase
        speed = fh["speed"][()]
        del fh["speed"]
        fh.create_dataset("speed", data=-speed.astype(np.float64))
        del fh["frames/left"]
        fh.create_dataset("frames/left", data=np.zeros((9, RES[0], RES[1] + 1, 3), np.uint8))

    tamper(path, 1, edit)
    name = episode_file(1)
    assert sorted(validate(path)) == sorted([
        f"{name}: steering has 2 values outside [-1, 1]",
        f"{name}: lateral_offset has 1 non-finite values (NaN or inf)",
        f"{name}: perturbation_phase has 1 values outside {{0, 1, 2}}",
        f"{name}: speed has dtype float64, expected float32",
        f"{name}: speed has 9 values outside [0, inf]",
        f"{name}: frames/left has shape (9, {RES[0]}, {RES[1] + 1}, 3), expected (9, {RES[0]}, {RES[1]}, 3)",
    ])


def test_validate_reports_length_mismatch_and_missing_series(dataset):
    path, _ = dataset

    def edit(fh):
        time = fh["time"][()]
        del fh["time"]
        fh.create_dataset("time", data=time[:-1])
        del fh["curvature"]

    tamper(path, 0, edit)
    name = episode_file(0)
    assert sorted(validate(path)) == [f"{name}: dataset curvature is missing",
                                      f"{name}: time has shape (11,), expected (12,)"]


def test_validate_reports_stray_files(dataset):
    path, _ = dataset
    shutil.copy(path / episode_file(0), path / episode_file(7))  # a copy: its episode attribute is 0
    (path / "notes.txt").write_text("hello")
    problems = validate(path)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{episode_file(7)}: not listed in the manifest")
    assert problems[1].startswith("notes.txt: not listed in the manifest")


# ----------------------------------------------------------------------------- crash safety
KILL_SCRIPT = """
import importlib.util, os, signal, sys
sys.path.insert(0, {root!r})
import steerloop.driving_log.writer
spec = importlib.util.spec_from_file_location("log_tests", {tests!r})
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
where, out = sys.argv[1], sys.argv[2]
target = steerloop.driving_log.writer.episode_file(2)
real_replace, real_commit = os.replace, steerloop.driving_log.writer.DrivingLogWriter._commit_file

def replace(src, dst):
    if where == "before_rename" and dst.endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)  # tmp complete and fsynced, not yet renamed
    if where == "before_manifest" and dst.endswith(steerloop.driving_log.writer.MANIFEST) and os.path.exists(os.path.join(out, target)):
        os.kill(os.getpid(), signal.SIGKILL)  # episode renamed, manifest not yet replaced
    real_replace(src, dst)

def commit(self, final, image):
    if where == "mid_write" and final.endswith(target):
        with open(final + ".tmp", "wb") as fh:
            fh.write(image[: len(image) // 2])
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    real_commit(self, final, image)

os.replace = replace
steerloop.driving_log.writer.DrivingLogWriter._commit_file = commit
writer = tests.open_writer(out)
for index in range(4):
    writer.write_episode(index, tests.make_buffer(6, seed=index), tests.attrs_for(index))
"""


@pytest.mark.parametrize("where", ["mid_write", "before_rename", "before_manifest"])
def test_sigkill_while_writing_leaves_a_valid_dataset(tmp_path, where):
    out = tmp_path / "log"
    script = KILL_SCRIPT.format(root=str(ROOT), tests=str(Path(__file__).resolve()))
    result = subprocess.run([sys.executable, "-c", script, where, str(out)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == -signal.SIGKILL, result.stderr

    notes: list[str] = []
    assert validate(out, notes=notes) == []
    assert len(notes) >= 1 and "re-recorded" in notes[0]
    assert sorted(int(k) for k in read_manifest(out)["episodes"]) == [0, 1]
    write_dataset(tmp_path / "reference", [make_buffer(6, seed=index) for index in range(2)])
    for index in range(2):  # complete, and byte-identical to the same content written by this process
        name = episode_file(index)
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    with DrivingLog(out) as log:
        assert log.episodes == [0, 1]
        expected = make_buffer(6, seed=1).arrays()["frames/left"]
        np.testing.assert_array_equal(log.read_episode(1)["frames/left"], expected)

    writer = open_writer(out)  # resume: leftovers are cleaned up or overwritten
    assert writer.completed() == {0, 1}
    assert not list(out.glob("*.tmp"))
    for index in (2, 3):
        writer.write_episode(index, make_buffer(6, seed=index), attrs_for(index))
    notes.clear()
    assert validate(out, notes=notes) == [] and notes == []
    with DrivingLog(out, skip_corrupt=True) as log:
        assert log.episodes == [0, 1, 2, 3] and log.skipped == []
