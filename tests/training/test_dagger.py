"""DAgger loop mechanics on a tiny setup: the aggregate grows, iterations resume."""

from __future__ import annotations

import json

import pytest

from steerloop.driving_log import validate
from steerloop.training.dagger import DaggerConfig, run_dagger
from steerloop.training.record import RecordConfig, record
from steerloop.training.train import TrainConfig, train

TINY = (16, 32)


@pytest.fixture(scope="module")
def bc_start(tmp_path_factory):
    root = tmp_path_factory.mktemp("dagger")
    data = root / "expert"
    record(RecordConfig(out=str(data), episodes=2, track_length=60.0, resolution=TINY), progress=False)
    train(TrainConfig(data=[str(data)], out=str(root / "bc"), model="cnn-lstm", epochs=1, seq_len=4, batch_frames=16,
                      crop_top=4, input_size=TINY, threads=1, hidden=8), progress_bar=False)
    return root, str(data), str(root / "bc" / "best")


@pytest.mark.slow  # ~10 s; the tiny study (tests/evaluation/test_study.py) runs DAgger in the default suite
def test_iterations_grow_the_aggregate_and_resume(bc_start):
    root, data, init = bc_start
    scored = []
    cfg = DaggerConfig(init=init, data=[data], out=str(root / "run"), iterations=2, episodes_per_iter=1,
                       beta_schedule=(0.5, 0.0), epochs=1, track_length=60.0)
    rows = run_dagger(cfg, lambda ckpt, i: scored.append((ckpt, i)) or {"iteration": i}, progress=False)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["beta"] for r in rows] == [0.5, 0.0]
    assert [r["aggregate_datasets"] for r in rows] == [2, 3]  # the expert data plus one per iteration
    assert scored == [(rows[0]["checkpoint"], 0), (rows[1]["checkpoint"], 1)]
    for row in rows:
        assert validate(row["data"]) == []
        manifest = json.loads((root / "run" / f"iter_{row['iteration']:02d}" / "data" / "manifest.json").read_text())
        assert manifest["config"]["learner"] is not None and manifest["extra"]["expert"]["law"] == "stanley"
    table = json.loads((root / "run" / "dagger.json").read_text())
    assert len(table["iterations"]) == 2
    # Re-running the finished run does nothing (no iteration is recorded or scored again).
    again = run_dagger(cfg, lambda ckpt, i: pytest.fail("a finished iteration was re-run"), progress=False)
    assert again == rows


def test_bad_dagger_config_is_refused():
    with pytest.raises(ValueError, match="init"):
        DaggerConfig(data=["x"])
    with pytest.raises(ValueError, match="beta"):
        DaggerConfig(init="x", data=["x"], beta_schedule=(1.5,))
