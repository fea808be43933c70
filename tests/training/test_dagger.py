"""DAgger loop mechanics on a tiny setup: the aggregate grows, iterations resume, and each
iteration's episodes cycle through the visual conditions (built in or a user's file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from steerloop.driving_log import MANIFEST, DrivingLog, episode_file, validate
from steerloop.evaluation import study as study_module
from steerloop.evaluation.cli import main
from steerloop.evaluation.study import StudyError, load_study, plan_study
from steerloop.training.dagger import DaggerConfig, _iteration_recording, run_dagger
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


# ----------------------------------------------------------------------------- visual conditions
MINE = ('[weather.mist]\nbase = "haze"\nfog = 0.05\nsplit = "held_out"\n'
        '[conditions.misty]\nscenery = "forest"\nweather = "mist"\n')
# DaggerConfig(init="i", data=["d"]).run_config() as main (3039987) stored it in dagger.json:
# runs that set no conditions resume as before.
MAIN_RUN_CONFIG = {"init": "i", "data": ["d"], "out": "runs/dagger", "iterations": 4, "episodes_per_iter": 10,
                   "beta_schedule": [0.5, 0.25, 0.0], "mixture": "step", "retrain": "scratch", "epochs": 4,
                   "workers": 1, "seed": 0, "track_length": 400.0}


def tiny_dagger(bc_start, out, **overrides) -> DaggerConfig:
    """One iteration of ``episodes_per_iter`` learner-driven 60 m episodes, one training epoch."""
    _, data, init = bc_start
    return DaggerConfig(**{"init": init, "data": [data], "out": str(out), "iterations": 1, "episodes_per_iter": 3,
                           "beta_schedule": (0.0,), "epochs": 1, "track_length": 60.0, **overrides})


def episode_conditions(data_dir) -> list[str]:
    with DrivingLog(data_dir) as log:
        return [log.episode_attrs(i)["condition"] for i in range(len(log))]


@pytest.fixture(scope="module")
def two_conditions(bc_start, tmp_path_factory):
    """A one-iteration DAgger run under ("default", "dusk") with 1 worker (in ``run``)."""
    root = tmp_path_factory.mktemp("dagger-conditions")
    run_dagger(tiny_dagger(bc_start, root / "run", conditions=("default", "dusk"), workers=1), progress=False)
    return root


def test_iteration_episodes_cycle_through_the_conditions(two_conditions):
    data = two_conditions / "run" / "iter_00" / "data"
    assert episode_conditions(data) == ["default", "dusk", "default"]  # as record assigns them
    manifest = json.loads((data / MANIFEST).read_text())
    assert manifest["config"]["conditions"] == ["default", "dusk"] and manifest["config"]["learner"] is not None
    table = json.loads((two_conditions / "run" / "dagger.json").read_text())
    assert table["config"]["conditions"] == ["default", "dusk"] and "condition_file" not in table["config"]
    assert validate(str(data)) == []


def test_the_condition_cycle_continues_across_iterations(tmp_path):
    """Episode k of iteration i drives conditions[(i * episodes_per_iter + k) % n]: with 3 episodes an
    iteration and 4 conditions, no condition is left out after the first iteration."""
    cfg = DaggerConfig(init="i", data=["d"], out=str(tmp_path), episodes_per_iter=3,
                       conditions=("default", "dusk", "worn", "desert"))
    rotations = [_iteration_recording(cfg, i, "learner", TINY).conditions for i in range(3)]
    assert rotations == [("default", "dusk", "worn", "desert"), ("desert", "default", "dusk", "worn"),
                         ("worn", "desert", "default", "dusk")]
    driven = [rotation[k % 4] for rotation in rotations for k in range(3)]
    assert driven == ["default", "dusk", "worn", "desert", "default", "dusk", "worn", "desert", "default"]
    single = DaggerConfig(init="i", data=["d"], out=str(tmp_path), episodes_per_iter=3)
    assert _iteration_recording(single, 2, "learner", TINY).conditions == ("default",)


@pytest.mark.slow  # two worker processes; record's own tests check 1 vs 2 workers in the default suite
def test_worker_count_does_not_change_the_iteration_logs(bc_start, two_conditions):
    """The iteration's recording (the very RecordConfig run_dagger makes) with 2 workers equals
    the run's, recorded with 1 (not retrained, to keep the test short)."""
    _, _, init = bc_start
    two = tiny_dagger(bc_start, two_conditions / "w2", conditions=("default", "dusk"), workers=2)
    record(_iteration_recording(two, 0, init, TINY), progress=False)
    one, two = two_conditions / "run" / "iter_00" / "data", two_conditions / "w2" / "iter_00" / "data"
    for index in range(3):
        name = episode_file(index)
        assert (one / name).read_bytes() == (two / name).read_bytes(), f"{name} differs between 1 and 2 workers"
    manifests = [json.loads((d / MANIFEST).read_text()) for d in (one, two)]
    strip = [{k: v for k, v in m["config"].items() if k != "workers"} for m in manifests]
    assert strip[0] == strip[1]
    assert [{k: e[k] for k in ("sha256", "length", "attrs")} for e in manifests[0]["episodes"].values()] == \
        [{k: e[k] for k in ("sha256", "length", "attrs")} for e in manifests[1]["episodes"].values()]


def test_a_resume_with_other_conditions_is_refused(bc_start, two_conditions):
    table = two_conditions / "run" / "dagger.json"
    before = table.read_bytes()
    for conditions in (("default",), ("dusk", "default")):
        with pytest.raises(ValueError, match=r"conditions: .*run holds a DAgger run under conditions "
                                             r"\['default', 'dusk'\], not"):
            run_dagger(tiny_dagger(bc_start, two_conditions / "run", conditions=conditions, workers=1),
                       progress=False)
    assert table.read_bytes() == before


def test_without_conditions_the_run_config_is_main_s():
    assert DaggerConfig(init="i", data=["d"]).run_config() == MAIN_RUN_CONFIG
    assert DaggerConfig(init="i", data=["d"], conditions=["default"]).run_config() == MAIN_RUN_CONFIG
    assert DaggerConfig(init="i", data=["d"], conditions=("dusk",)).run_config() == \
        {**MAIN_RUN_CONFIG, "conditions": ["dusk"]}


def test_bad_conditions_are_refused_like_record_s():
    with pytest.raises(ValueError, match=r"conditions\[1\]: unknown condition 'fgo'.*choose from"):
        DaggerConfig(init="i", data=["d"], conditions=("default", "fgo"))
    with pytest.raises(ValueError, match="conditions: give at least one visual condition"):
        DaggerConfig(init="i", data=["d"], conditions=())


def test_cli_bad_condition_exits_2_naming_the_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["dagger", "--init", "ckpt", "--data", "data", "--out", str(out), "--conditions", "default,fog"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("steerloop dagger: --conditions[1]: unknown condition 'fog'") and "'dusk'" in err
    assert main(["dagger", "--init", "ckpt", "--data", "data", "--out", str(out), "--conditions", "misty",
                 "--condition-file", str(tmp_path / "missing.toml")]) == 2
    assert f"condition file {tmp_path / 'missing.toml'} does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_cli_dagger_under_a_condition_file_end_to_end(bc_start, tmp_path, capsys):
    """--conditions/--condition-file: the iteration drives the file's condition, the manifest and
    dagger.json hold its content hash; a resume with other content (or none) is refused, exit 2."""
    _, data, init = bc_start
    mine = tmp_path / "conds" / "mine.toml"
    mine.parent.mkdir()
    mine.write_text(MINE)
    suite = tmp_path / "tiny.json"
    suite.write_text(json.dumps({"name": "tiny", "tracks": [200000], "track_length": 60.0}))
    out = tmp_path / "run"
    argv = ["dagger", "--init", init, "--data", data, "--out", str(out), "--iterations", "1", "--episodes-per-iter",
            "1", "--beta-schedule", "0", "--epochs", "1", "--track-length", "60", "--conditions", "misty",
            "--condition-file", str(mine), "--suite", str(suite), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    digest = hashlib.sha256(MINE.encode()).hexdigest()
    assert episode_conditions(out / "iter_00" / "data") == ["misty"]
    manifest = json.loads((out / "iter_00" / "data" / MANIFEST).read_text())
    assert manifest["config"]["condition_file"]["sha256"] == digest
    assert manifest["config"]["condition_file"]["values"]["misty"]["weather"]["fog"] == 0.05
    table = json.loads((out / "dagger.json").read_text())
    assert table["config"]["condition_file"] == manifest["config"]["condition_file"]
    assert main(argv) == 0  # finished: the same command (same content) does nothing more
    capsys.readouterr()
    before = (out / "dagger.json").read_bytes()
    mine.write_text(MINE.replace("0.05", "0.07"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"condition file {mine}: its content" in err and "was run with" in err
    assert main(argv[:argv.index("--conditions")] + ["--conditions", "default", "--suite", str(suite), "--quiet"]) == 2
    assert "holds a DAgger run under conditions ['misty']" in capsys.readouterr().err
    assert (out / "dagger.json").read_bytes() == before


# ----------------------------------------------------------------------------- in a study
STUDY = """
[study]
suites = ["smoke"]
offline_data = "val"
[datasets.val]
suite = "val"
episodes = 1
[policies.p]
model = "pilotnet"
data = ["val"]
[policies.d]
dagger = { init = "p", iterations = 1, episodes_per_iter = 2 }
"""
# The DAgger stage key of STUDY as main planned it before DAgger took conditions (5c593146e1 at
# 3039987), re-pinned when every record key gained the world digest of its conditions (78a6950:
# `default` gained scenery, so the init policy's dataset, and every key built on it, changed).
MAIN_DAGGER_KEY = "69b46b9571"


def dagger_stage(tmp_path, text=STUDY):
    path = tmp_path / "study.toml"
    path.write_text(text)
    plan = plan_study(load_study(str(path)), tmp_path / "out")
    return plan, plan.policies["d"]


def test_study_dagger_key_is_unchanged_without_conditions(tmp_path):
    _, stage = dagger_stage(tmp_path)
    assert stage.key == MAIN_DAGGER_KEY
    _, explicit = dagger_stage(tmp_path, STUDY.replace("episodes_per_iter = 2", 'episodes_per_iter = 2, '
                                                      'conditions = ["default"]'))
    assert explicit.key == MAIN_DAGGER_KEY  # the default, spelled out: the same run


def test_study_dagger_conditions_and_file_are_in_the_key_and_reach_the_run(tmp_path, monkeypatch):
    _, plain = dagger_stage(tmp_path)
    two = STUDY.replace("episodes_per_iter = 2", 'episodes_per_iter = 2, conditions = ["default", "dusk"]')
    _, with_two = dagger_stage(tmp_path, two)
    assert with_two.key != plain.key and with_two.params["config"]["conditions"] == ("default", "dusk")
    (tmp_path / "conds").mkdir()
    (tmp_path / "conds" / "mine.toml").write_text(MINE)
    mine = STUDY.replace("episodes_per_iter = 2", 'episodes_per_iter = 2, conditions = ["misty"], '
                                                  'condition_file = "conds/mine.toml"')
    plan, stage = dagger_stage(tmp_path, mine)
    assert stage.params["config"]["condition_file"] == str((tmp_path / "conds" / "mine.toml").resolve())
    (tmp_path / "elsewhere.toml").write_text(MINE)  # the same content at another path: the same key
    assert dagger_stage(tmp_path, mine.replace("conds/mine.toml", "elsewhere.toml"))[1].key == stage.key
    (tmp_path / "conds" / "mine.toml").write_text(MINE.replace("0.05", "0.07"))
    assert dagger_stage(tmp_path, mine)[1].key != stage.key  # other content: another run
    (tmp_path / "conds" / "mine.toml").write_text(MINE)
    ran = []
    monkeypatch.setattr("steerloop.training.dagger.run_dagger", lambda cfg, progress: ran.append(cfg) or [])
    study_module._run_stage(plan, stage, workers=1, progress=False)
    assert ran[0].conditions == ("misty",) and ran[0].condition_source.sha256 == hashlib.sha256(MINE.encode()).hexdigest()
    assert ran[0].out == str(stage.out)


def test_study_dagger_bad_condition_names_the_table(tmp_path):
    with pytest.raises(StudyError, match=r"\[policies.d\] dagger: conditions\[0\]: unknown condition 'fgo'"):
        dagger_stage(tmp_path, STUDY.replace("episodes_per_iter = 2", 'episodes_per_iter = 2, conditions = ["fgo"]'))
    with pytest.raises(StudyError, match=r"\[policies.d\] dagger: condition file .*none.toml does not exist"):
        dagger_stage(tmp_path, STUDY.replace("episodes_per_iter = 2", 'episodes_per_iter = 2, conditions = ["x"], '
                                                                      'condition_file = "none.toml"'))


def test_a_condition_file_edited_between_iterations_is_refused(tmp_path):
    """The run's content is fixed when it starts: an iteration never records under edited values."""
    mine = tmp_path / "mine.toml"
    mine.write_text(MINE)
    cfg = DaggerConfig(init="ckpt", data=["data"], out=str(tmp_path / "run"), conditions=("misty",),
                       condition_file=str(mine))
    assert _iteration_recording(cfg, 0, "ckpt", TINY).condition_source.sha256 == cfg.condition_source.sha256
    mine.write_text(MINE.replace("0.05", "0.07"))
    with pytest.raises(ValueError, match=rf"condition file {mine}: its content changed during the DAgger run"):
        _iteration_recording(cfg, 1, "ckpt", TINY)
    assert not (tmp_path / "run").exists()
