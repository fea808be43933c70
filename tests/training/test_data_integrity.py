"""Episode checksums are verified before a driving log is used for training, offline metrics or
DAgger: one flipped bit in a label refuses the run (exit 2, one line naming the file) instead of
training on a label of ~1e3 and reporting a meaningless RMSE with exit 0."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import steerloop.driving_log.integrity as log_module
from steerloop.evaluation.cli import main
from steerloop.evaluation.offline import evaluate_offline
from steerloop.driving_log import CorruptEpisodeError, episode_file, validate
from steerloop.training.dagger import DaggerConfig, run_dagger
from steerloop.training.data import load_episodes
from steerloop.training.record import RecordConfig, record
from steerloop.training.train import TrainConfig, train

from helpers import SHORT_SPEC

TINY = (16, 32)
EXPONENT_BIT = 0x40  # top byte of a little-endian float32: multiplies a label below 2 in magnitude by 2**128


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """3 expert episodes on the short spec at 16x32, never modified."""
    root = tmp_path_factory.mktemp("integrity")
    spec = root / "short.json"
    spec.write_text(json.dumps(SHORT_SPEC))
    record(RecordConfig(out=str(root / "log"), episodes=3, track=str(spec), resolution=TINY), progress=False)
    return root / "log"


def flip_label_bit(file: Path) -> tuple[float, float]:
    """Flip one exponent bit of the largest ``expert_steering`` label in place (the file keeps
    its size and stays a readable HDF5 file); returns the label before and after."""
    with h5py.File(file, "r") as fh:
        dataset = fh["expert_steering"]
        assert dataset.dtype == np.dtype("<f4") and dataset.chunks is None  # contiguous little-endian
        step = int(np.argmax(np.abs(dataset[()])))
        offset, before = dataset.id.get_offset(), float(dataset[step])
    data = bytearray(file.read_bytes())
    data[offset + 4 * step + 3] ^= EXPONENT_BIT
    size = file.stat().st_size
    file.write_bytes(bytes(data))
    assert file.stat().st_size == size
    with h5py.File(file, "r") as fh:
        after = float(fh["expert_steering"][step])
    return before, after


@pytest.fixture
def corrupt(clean, tmp_path) -> Path:
    """A copy of ``clean`` with one bit of episode 1's expert_steering flipped."""
    path = tmp_path / "data"
    shutil.copytree(clean, path)
    before, after = flip_label_bit(path / episode_file(1))
    assert abs(before) < 1 and abs(after) > 100 and np.isfinite(after)  # a plausible-looking, absurd label
    assert validate(path)[0].startswith(f"{episode_file(1)}: sha256")
    return path


def tiny_train_config(data: Path, out: Path) -> TrainConfig:
    return TrainConfig(data=[str(data)], out=str(out), model="pilotnet", epochs=1, batch_frames=16, crop_top=4,
                       input_size=TINY, threads=1, warmup_steps=5)


def assert_one_line_naming_the_file(err: str, command: str, data: Path) -> None:
    (line,) = err.strip().splitlines()
    assert line.startswith(f"steerloop {command}: {data / episode_file(1)}: sha256 mismatch"), line
    assert f"steerloop validate {data}" in line and "re-record" in line and "Traceback" not in err


# ----------------------------------------------------------------------------- train
def test_train_refuses_a_flipped_label_bit(corrupt, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(CorruptEpisodeError, match=episode_file(1)):
        train(tiny_train_config(corrupt, out), progress_bar=False)
    assert not out.exists()  # nothing written, not even train_config.json


def test_train_command_exits_2_with_one_line(corrupt, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["train", "--data", str(corrupt), "--out", str(out), "--model", "pilotnet", "--epochs", "1",
                 "--threads", "1", "--quiet"])
    assert code == 2
    assert_one_line_naming_the_file(capsys.readouterr().err, "train", corrupt)
    assert not out.exists()


def test_training_verifies_each_unchanged_file_once(clean, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    past = time.time_ns() - 60 * 10**9  # older than the racy-timestamp window
    for file in data.glob("episode_*.h5"):
        os.utime(file, ns=(past, past))
    hashed = []
    real = log_module._sha256_file
    monkeypatch.setattr(log_module, "_sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    load_episodes([str(data)], ("center",))
    assert sorted(hashed) == [episode_file(i) for i in range(3)]
    load_episodes([str(data)], ("center",))  # e.g. the next DAgger iteration
    assert len(hashed) == 3
    flip_label_bit(data / episode_file(2))  # same size; the write gives a new mtime
    with pytest.raises(CorruptEpisodeError, match=episode_file(2)):
        load_episodes([str(data)], ("center",))
    assert hashed[3:] == [episode_file(2)]


# ----------------------------------------------------------------------------- offline
def test_offline_refuses_a_flipped_label_bit(corrupt, clean, tmp_path, capsys):
    assert evaluate_offline("zeros", str(clean))["model"]["rmse"] < 1  # the intact copy is fine
    out = tmp_path / "offline.json"
    with pytest.raises(CorruptEpisodeError, match=episode_file(1)):
        evaluate_offline("zeros", str(corrupt), out=str(out))
    code = main(["offline", "--policy", "zeros", "--data", str(corrupt), "--out", str(out)])
    assert code == 2
    assert_one_line_naming_the_file(capsys.readouterr().err, "offline", corrupt)
    assert not out.exists()


# ----------------------------------------------------------------------------- DAgger
def test_dagger_refuses_before_recording_or_training(corrupt, tmp_path):
    out = tmp_path / "dagger"
    cfg = DaggerConfig(init=str(tmp_path / "bc"), data=[str(corrupt)], out=str(out), iterations=1,
                       episodes_per_iter=1, epochs=1, track_length=60.0)
    with pytest.raises(CorruptEpisodeError, match=episode_file(1)):
        run_dagger(cfg, progress=False)
    assert not out.exists()
