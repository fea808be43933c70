"""User condition files named from suites, the command line, recordings and study datasets.

Runs that name no condition file keep every identity they had (dataset configs, suite dicts:
study cache keys and run ids); runs that name one carry the file's content to their workers
(never its path), record its content hash and the values used, and refuse a resume with
other content. Bad input is one line naming the file or field and the valid values (exit 2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from helpers import SHORT_SPEC, TINY
from steerloop.driving_log import MANIFEST, LogError
from steerloop.evaluation.cli import main
from steerloop.evaluation.regress import suite_from_dict
from steerloop.evaluation.runner import ResultsError, close_env_pool, evaluate
from steerloop.evaluation.study import StudyError, load_study, plan_study
from steerloop.evaluation.suites import SuiteError, builtin_suite, load_suite
from steerloop.sim import conditions
from steerloop.sim.env import LaneKeepEnv
from steerloop.training.record import RecordConfig, episode_jobs, record, record_episode
from steerloop.training.rl import RLConfig, make_training_env, train_rl

MINE = ('[weather.mist]\nbase = "haze"\nfog = 0.05\nsplit = "held_out"\n'
        '[conditions.misty]\nscenery = "forest"\nweather = "mist"\n')
# What main (before condition files) gave; study cache keys and run ids hash exactly these.
MAIN_DATASET_CONFIG = {"episodes": 20, "suite": "train", "seed": 0, "track": None, "track_length": 400.0,
                       "noise": 0.0, "noise_kind": "gaussian", "cameras": ["center"], "conditions": ["default"],
                       "resolution": [66, 200], "speed": 10.0, "expert": "stanley", "learner": None, "beta": 1.0,
                       "mixture": "step"}
MAIN_SUITE_SHA256 = {
    "smoke": "8860e3e7679905b65d12314e96576d78384aacb21634aadb688242b64273d25e",
    "test": "10b85f835c852d2f543c23f755348b3033741930f829d32f929312a9f3342268",
    # shift cycles through the held-out conditions: town-traffic and mountain-fog changed the conditions of
    # its scenarios, nothing else (main before them: 6ee247d61be0...)
    "shift": "a818b107120ab4e86700b9d152c3c8bc71bef480856f113dd6fe19f61903b9f6",
}
MAIN_NOISY_DATASET_SHA256 = "f14ccac76e34851da07288b02bf4d33725524ec1c36e0faf75783efd3086a88b"


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@pytest.fixture
def mine(tmp_path) -> Path:
    path = tmp_path / "conds" / "mine.toml"
    path.parent.mkdir()
    path.write_text(MINE)
    return path


@pytest.fixture
def short_track(tmp_path) -> Path:
    path = tmp_path / "short.json"
    path.write_text(json.dumps(SHORT_SPEC))
    return path


# ----------------------------------------------------------------------------- unchanged without a file
def _without_world(identity: dict) -> dict:
    return {key: value for key, value in identity.items() if key != "world"}


def test_without_a_condition_file_identities_add_only_the_world_digest(tmp_path):
    assert _without_world(RecordConfig().dataset_config()) == MAIN_DATASET_CONFIG
    noisy = RecordConfig(conditions=("dusk", "rural"), noise=0.1).dataset_config()
    assert _sha(_without_world(noisy)) == MAIN_NOISY_DATASET_SHA256
    assert noisy["world"] == conditions.world_digest(["dusk", "rural"])
    for name, digest in MAIN_SUITE_SHA256.items():
        assert _sha(_without_world(builtin_suite(name).to_dict())) == digest
    suite_file = tmp_path / "s.json"
    suite_file.write_text(json.dumps({"tracks": [5], "conditions": ["default", "dusk"]}))
    assert set(load_suite(str(suite_file)).to_dict()) == {"name", "scenarios", "world"}
    assert "condition_file" not in RLConfig().run_config()


def test_the_world_digest_follows_what_a_condition_is_made_of(tmp_path):
    """A recording's and a run's identity change when a condition's values change (``default``
    gaining scenery invalidates caches of its old look), and not with the order of the names."""
    assert conditions.world_digest(["default"]) != conditions.world_digest(["flat"])
    assert conditions.world_digest(["dusk", "rural", "dusk"]) == conditions.world_digest(["rural", "dusk"])
    path = tmp_path / "c.toml"
    path.write_text('[scenery.mine]\nbase = "meadow"\ntrees = 1.0\n[conditions.x]\nscenery = "mine"\nweather = "noon"\n')
    before = conditions.read_condition_file(path).conditions
    path.write_text(path.read_text().replace("trees = 1.0", "trees = 2.0"))
    after = conditions.read_condition_file(path).conditions
    assert conditions.world_digest(["x"], before) != conditions.world_digest(["x"], after)
    assert conditions.world_digest(["default"], before) == conditions.world_digest(["default"])


# ----------------------------------------------------------------------------- suites
def test_a_suite_file_names_its_condition_file_relative_to_itself(tmp_path, mine, short_track):
    suite_file = tmp_path / "mine.json"
    suite_file.write_text(json.dumps({"name": "mine", "tracks": ["short.json"], "conditions": ["misty", "held_out"],
                                      "condition_file": "conds/mine.toml"}))
    suite = load_suite(str(suite_file))
    names = [s.condition for s in suite.scenarios]
    assert names[0] == "misty" and "misty" in names[1:] and "dusk" in names  # held_out includes the file's
    digest = hashlib.sha256(mine.read_bytes()).hexdigest()
    assert suite.to_dict()["condition_file"] == {"sha256": digest, "content": conditions.read_condition_file(mine).content}
    assert suite_from_dict(json.loads(json.dumps(suite.to_dict()))).to_dict() == suite.to_dict()  # regress's run.json


def test_evaluate_drives_the_file_s_condition_from_its_content(tmp_path, mine, short_track):
    suite_file = tmp_path / "mine.json"
    suite_file.write_text(json.dumps({"name": "mine", "tracks": ["short.json"], "conditions": ["misty"]}))
    suite = pickle.loads(pickle.dumps(load_suite(str(suite_file), str(mine))))  # as a worker process receives it
    mine.unlink()  # the simulators are built from the content that came with the suite
    try:
        results = evaluate("expert", suite, tmp_path / "out", resolution=TINY, progress=False, plots=False)
    finally:
        close_env_pool()
    assert results["scenarios"][0]["condition"] == "misty" and results["aggregate"]["success_rate"] == 1.0
    assert results["condition_file"]["sha256"] == suite.condition_file.sha256
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["suite"]["condition_file"]["content"]["weather"]["mist"]["fog"] == 0.05
    mine.write_text(MINE.replace("0.05", "0.06"))
    with pytest.raises(ResultsError, match=rf"condition file {mine}: its content .* is not what .*out was evaluated"):
        evaluate("expert", load_suite(str(suite_file), str(mine)), tmp_path / "out", resolution=TINY, progress=False)


def test_suite_condition_file_errors_name_the_file_and_field(tmp_path, mine):
    suite_file = tmp_path / "s.json"
    suite_file.write_text(json.dumps({"tracks": [5], "conditions": ["misty"], "condition_file": "nope.toml"}))
    with pytest.raises(SuiteError, match=r"condition file .*nope.toml does not exist"):
        load_suite(str(suite_file))
    suite_file.write_text(json.dumps({"tracks": [5], "conditions": ["misti"], "condition_file": "conds/mine.toml"}))
    with pytest.raises(SuiteError, match=r"conditions\[0\]: unknown condition 'misti' \(did you mean 'misty'\?\).*"
                                         r"\(built in or from condition file .*mine.toml\)"):
        load_suite(str(suite_file))
    suite_file.write_text(json.dumps({"tracks": [5], "conditions": ["misty"]}))
    with pytest.raises(SuiteError, match=r"unknown condition 'misty'"):
        load_suite(str(suite_file))  # no file: the built-ins only


# ----------------------------------------------------------------------------- recording
def test_record_stores_hash_and_values_and_refuses_other_content(tmp_path, mine, short_track):
    cfg = RecordConfig(out=str(tmp_path / "data"), episodes=1, track=str(short_track), resolution=TINY,
                       conditions=("misty",), condition_file=str(mine))
    record(cfg, progress=False)
    manifest = json.loads((tmp_path / "data" / MANIFEST).read_text())
    recorded = manifest["config"]["condition_file"]
    assert recorded["sha256"] == hashlib.sha256(mine.read_bytes()).hexdigest()
    assert recorded["values"]["misty"]["weather"]["name"] == "mist" and recorded["values"]["misty"]["weather"]["fog"] == 0.05
    assert manifest["extra"]["condition_file"] == str(mine)
    before = (tmp_path / "data" / MANIFEST).read_bytes()
    assert record(cfg, progress=False)["episodes_recorded"] == 0  # same content: resumes (nothing to do)
    mine.write_text(MINE.replace("0.05", "0.06"))
    with pytest.raises(LogError, match=rf"condition file {mine}: its content .* is not what .*data was recorded "
                                       r"with \(content sha256"):
        record(dataclasses.replace(cfg), progress=False)  # the file is read again
    assert (tmp_path / "data" / MANIFEST).read_bytes() == before


def test_record_workers_rebuild_the_conditions_from_the_content(tmp_path, mine, short_track):
    cfg = RecordConfig(out=str(tmp_path / "data"), episodes=1, track=str(short_track), resolution=TINY,
                       conditions=("misty",), condition_file=str(mine))
    sent = pickle.loads(pickle.dumps(cfg))  # what multiprocessing and Ray hand a worker
    mine.unlink()
    job = episode_jobs(sent)[0]
    _, buffer, attrs = record_episode(sent, job)
    assert attrs["condition"] == "misty" and attrs["success"] and len(buffer) > 0


def test_train_rl_envs_rebuild_the_conditions_and_a_resume_checks_the_content(tmp_path, mine):
    cfg = RLConfig(out=str(tmp_path / "rl"), conditions=("misty",), condition_file=str(mine), resolution=(36, 36),
                   track_length=60.0)
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "config.json").write_text(json.dumps({"run": {**cfg.run_config(), "condition_file": {
        "sha256": "0" * 64}}}))
    with pytest.raises(ValueError, match=rf"condition file {mine}: its content .* is not what .*rl was trained with"):
        train_rl(cfg, progress=False)
    sent = pickle.loads(pickle.dumps(cfg))  # what SubprocVecEnv's workers receive
    mine.unlink()
    env = make_training_env(sent)
    try:
        assert env.reset(seed=0)[1]["condition"] == "misty"
    finally:
        env.close()


# ----------------------------------------------------------------------------- the environment
def test_env_takes_the_file_or_its_content_with_identical_frames(mine):
    frames = []
    for source in (str(mine), conditions.read_condition_file(mine).content):
        env = LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, condition="misty", condition_file=source)
        try:
            obs, _ = env.reset(seed=3)
            frames.append(obs["image"])
        finally:
            env.close()
    assert np.array_equal(frames[0], frames[1])
    with pytest.raises(conditions.ConditionError, match=r"condition_file: weather.mist.fog: must be a number"):
        LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, condition_file={"weather": {"mist": {"fog": "thick"}}})


# ----------------------------------------------------------------------------- the command line
def _one_line_error(capsys, argv, *patterns) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    for pattern in patterns:
        assert pattern in err, err
    return err


@pytest.mark.parametrize("command, extra", [
    ("record", ["--out", "OUT", "--conditions"]),
    ("train-rl", ["--out", "OUT", "--conditions"]),
    ("drive", ["--condition"]),
    ("evaluate", ["--policy", "expert", "--out", "OUT", "--suite", "SUITE"]),
])
def test_cli_condition_file_errors_are_one_line_exit_2(capsys, tmp_path, mine, command, extra):
    suite_file = tmp_path / "s.json"
    suite_file.write_text(json.dumps({"tracks": [5], "conditions": ["mistee"]}))
    argv = [command] + [str(tmp_path / "out") if a == "OUT" else str(suite_file) if a == "SUITE" else a for a in extra]
    if command != "evaluate":
        argv.append("mistee")
    _one_line_error(capsys, argv + ["--condition-file", str(tmp_path / "missing.toml")],
                    f"condition file {tmp_path / 'missing.toml'} does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[weather.x]\nfgo = 0.1\n")
    _one_line_error(capsys, argv + ["--condition-file", str(bad)], f"condition file {bad}: weather.x: unknown key "
                    "'fgo' (did you mean 'fog'?)")
    _one_line_error(capsys, argv + ["--condition-file", str(mine)], "unknown condition 'mistee' (did you mean "
                    "'misty'?)", "'misty'", f"from condition file {mine}")
    assert not (tmp_path / "out").exists()


def test_cli_record_refuses_a_resume_with_another_file_content(capsys, tmp_path, mine, short_track):
    argv = ["record", "--out", str(tmp_path / "data"), "--episodes", "1", "--track", str(short_track),
            "--resolution", "16x32", "--conditions", "misty", "--condition-file", str(mine), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    mine.write_text(MINE + "# edited\n")
    _one_line_error(capsys, argv, f"condition file {mine}: its content", "restore that file to resume")


# ----------------------------------------------------------------------------- studies
STUDY = """
[study]
suites = ["smoke"]
offline_data = "val"
[datasets.val]
suite = "val"
episodes = 1
conditions = ["misty"]
condition_file = "conds/mine.toml"
[policies.p]
model = "pilotnet"
data = ["val"]
"""


def test_study_dataset_names_a_condition_file_relative_to_the_study(tmp_path, mine):
    study = tmp_path / "study.toml"
    study.write_text(STUDY)
    cfg = load_study(str(study))
    assert cfg.datasets["val"]["condition_file"] == str(mine.resolve())
    key = plan_study(cfg, tmp_path / "out").datasets["val"].key
    mine.write_text(MINE.replace("0.05", "0.07"))
    assert plan_study(load_study(str(study)), tmp_path / "out").datasets["val"].key != key  # content, not path
    study.write_text(STUDY.replace("conds/mine.toml", "conds/none.toml"))
    with pytest.raises(StudyError, match=r"\[datasets.val\]: condition file .*none.toml does not exist"):
        load_study(str(study))


def test_short_loop_restarts_a_log_recorded_under_a_condition_file(tmp_path, mine, short_track):
    """The manifest's values rebuild the user's conditions: the file itself is not needed."""
    from steerloop.driving_log import DrivingLog
    from steerloop.evaluation.short_loop import env_for_log, logged_start

    record(RecordConfig(out=str(tmp_path / "data"), episodes=1, track=str(short_track), resolution=TINY,
                        conditions=("misty",), condition_file=str(mine)), progress=False)
    mine.unlink()
    with DrivingLog(tmp_path / "data") as log:
        env = env_for_log(log)
        data = log.read_episode(0, cameras=["center"])
        attrs = log.episode_attrs(0)
        obs, info = env.reset(seed=int(attrs["seed"]), options={"track": attrs["track_spec"], "condition": "misty",
                                                                 **logged_start(data, 40)})
        assert info["condition"] == "misty" and abs(info["lateral_offset"] - data["lateral_offset"][40]) < 0.01
        np.testing.assert_array_equal(obs["image"], data["frames/center"][40])  # the same mist, the same pixels
        env.close()
