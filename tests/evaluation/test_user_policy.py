"""A user's own policy, defined in a file outside the repository, in every command: named by
its spec (``driver.py:load`` + kwargs) it gives exactly the results of the same model wrapped
as an object in-process (evaluate with 2 workers, offline, regress and its cache, the pytest
fixture, a study, DAgger recording, drive); bad policies are one-line errors, exit 2, and
leave nothing half-written."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from steerloop.agents.protocol import PolicyError
from steerloop.evaluation.cli import main
from steerloop.evaluation.offline import evaluate_offline, replay
from steerloop.evaluation.short_loop import ShortLoopConfig
from steerloop.evaluation.runner import evaluate
from steerloop.evaluation.suites import load_suite
from steerloop.driving_log import DrivingLog

from helpers import SHORT_SPEC

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
RES = "16x32"
RESOLUTION = (16, 32)
KWARGS = {"seed": 3}

DRIVER = '''
"""A user's steering model: a small CNN of theirs, as a steerloop policy."""
import numpy as np
import torch
from torch import nn

from steerloop import ModelPolicy, PolicyBase


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)),
                                      nn.Flatten())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return torch.tanh(self.head(self.features(x))).squeeze(1)


def load(seed=0):
    torch.manual_seed(seed)
    return ModelPolicy(Net(), resize=(12, 24), colour="yuv", mean=0.5, std=0.25)


class Bad(PolicyBase):
    """Misbehaves after ``after`` predict calls, as named by ``mode``."""

    def __init__(self, mode, after=0):
        self.mode, self.after, self.calls = mode, after, 0

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        self.calls += 1
        n = len(observation["image"])
        if self.calls <= self.after:
            return np.zeros((n, 1), np.float32), state
        if self.mode == "raise":
            raise RuntimeError("CUDA out of memory")
        if self.mode == "shape":
            return np.zeros((n, 2), np.float32), state
        if self.mode == "dtype":
            return np.zeros((n, 1), np.int32), state
        actions = np.zeros((n, 1), np.float32)
        actions[-1] = np.nan
        return actions, state


class NoPredict:
    def reset(self):
        pass
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A directory outside the repository with the user's policy file and a 2-scenario suite."""
    root = tmp_path_factory.mktemp("user")
    (root / "driver.py").write_text(DRIVER)
    (root / "broken.py").write_text("import torch\nimport no_such_package_for_steerloop\n")
    (root / "short.json").write_text(json.dumps(SHORT_SPEC))
    (root / "suite.json").write_text(json.dumps({"name": "tiny", "tracks": ["short.json"],
                                                 "conditions": ["default", "dusk"]}))
    assert not str(root).startswith(str(ROOT))
    return root


def user_object(user: Path, attr: str = "load", **kwargs):
    """The same user code imported in-process as a module of its own, and the object it makes."""
    spec = importlib.util.spec_from_file_location("users_own_driver", user / "driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)(**kwargs)


def same_results(a: Path, b: Path) -> None:
    assert (a / "results.json").read_bytes() == (b / "results.json").read_bytes()
    for path in sorted((a / "trajectories").iterdir()):
        with np.load(path) as x, np.load(b / "trajectories" / path.name) as y:
            assert x.files == y.files
            for key in x.files:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{path.name}: {key}")


def spec_of(user: Path, attr: str = "load") -> str:
    return f"{user / 'driver.py'}:{attr}"


@pytest.fixture(scope="module")
def evaluated(user, tmp_path_factory) -> Path:
    """``steerloop evaluate --workers 2`` of the user's spec (each worker re-creates it)."""
    out = tmp_path_factory.mktemp("eval") / "spec"
    code = main(["evaluate", "--policy", spec_of(user), "--policy-kwargs", json.dumps(KWARGS), "--suite",
                 str(user / "suite.json"), "--out", str(out), "--workers", "2", "--resolution", RES, "--quiet"])
    assert code == 0
    return out


# ----------------------------------------------------------------------------- identical results
def test_a_spec_with_two_workers_equals_the_object_in_process(user, evaluated, tmp_path):
    results = json.loads((evaluated / "results.json").read_text())
    assert [s["name"] for s in results["scenarios"]] == ["tiny-00-short-default", "tiny-01-short-dusk"]
    assert results["policy"]["kind"] == "model" and results["policy"]["class"] == "Net"
    assert len({s["metrics"]["steps"] for s in results["scenarios"]}) >= 1
    evaluate(user_object(user, **KWARGS), load_suite(str(user / "suite.json")), tmp_path / "object",
             name=spec_of(user), resolution=RESOLUTION, progress=False)
    same_results(evaluated, tmp_path / "object")


@pytest.mark.slow  # worker processes / a pytest subprocess: ~15 s each on 2 busy cores
def test_an_importable_object_is_pickled_to_two_workers(user, tmp_path):
    import torch

    from steerloop import ModelPolicy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, stride=2), torch.nn.Flatten(), torch.nn.LazyLinear(1),
                              torch.nn.Tanh())
    policy = ModelPolicy(net, resize=(8, 16))
    policy.predict({"image": np.zeros((1, *RESOLUTION, 3), np.uint8), "speed": np.zeros((1, 1), np.float32)})
    suite = load_suite(str(user / "suite.json"))
    for workers in (1, 2):
        evaluate(policy, suite, tmp_path / f"w{workers}", workers=workers, resolution=RESOLUTION, progress=False,
                 plots=False)
    same_results(tmp_path / "w1", tmp_path / "w2")


def test_an_object_that_cannot_reach_workers_fails_at_once(user, tmp_path):
    with pytest.raises(PolicyError, match=r"cannot be sent to worker processes .* name it by its spec, "
                                          r"package\.module:attr or path/to/file\.py:attr"):
        evaluate(user_object(user, **KWARGS), load_suite(str(user / "suite.json")), tmp_path / "out", workers=2,
                 resolution=RESOLUTION, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def dataset(user, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "log"
    assert main(["record", "--out", str(out), "--episodes", "1", "--track", str(user / "short.json"),
                 "--resolution", RES, "--quiet"]) == 0
    return out


def test_offline_of_a_spec_equals_the_object(user, dataset, tmp_path, capsys):
    out = tmp_path / "offline.json"
    assert main(["offline", "--policy", spec_of(user), "--policy-kwargs", json.dumps(KWARGS), "--data",
                 str(dataset), "--out", str(out)]) == 0
    assert "driver.py:load on" in capsys.readouterr().out
    by_spec = json.loads(out.read_text())
    by_object = evaluate_offline(user_object(user, **KWARGS), str(dataset), name=spec_of(user),
                                 short=ShortLoopConfig())  # the CLI's default short rollouts
    assert by_spec == json.loads(json.dumps(by_object))
    assert by_spec["short_loop"]["rollouts"] == 16
    assert by_spec["model"]["frames"] > 50 and by_spec["model"]["rmse"] != by_spec["zeros"]["rmse"]


# ----------------------------------------------------------------------------- regress and its cache
def test_regress_a_spec_against_the_expert_and_its_cache(user, evaluated, tmp_path, capsys):
    driver = tmp_path / "mine" / "driver.py"  # a copy the test may edit
    driver.parent.mkdir()
    driver.write_text(DRIVER)
    cache = tmp_path / "cache"

    def regress(*extra: str) -> int:
        code = main(["regress", "--policy", f"{driver}:load", "--policy-kwargs", json.dumps(KWARGS), "--baseline",
                     "expert", "--suite", str(user / "suite.json"), "--resolution", RES, "--out", str(cache),
                     "--quiet", *extra])
        assert code in (0, 1), capsys.readouterr().err
        return code

    assert regress() == 1  # the untrained model departs where the expert does not
    assert "candidate " + f"{driver}:load vs baseline expert on tiny" in capsys.readouterr().out
    (run,) = cache.glob("mine_driver.py_load-tiny-*")
    expected = json.loads((evaluated / "results.json").read_text())
    got = json.loads((run / "results.json").read_text())
    assert got["scenarios"] == expected["scenarios"] and got["aggregate"] == expected["aggregate"]
    trajectory = run / "trajectories" / "tiny-00-short-default.npz"
    stamp = trajectory.stat().st_mtime_ns
    regress()
    assert trajectory.stat().st_mtime_ns == stamp, "an unchanged policy is not driven again"
    regress("--no-cache")
    assert trajectory.stat().st_mtime_ns != stamp, "--no-cache drives it again"
    driver.write_text(DRIVER + "\n# the user edits their model\n")
    regress()
    assert len(list(cache.glob("mine_driver.py_load-tiny-*"))) == 2, "changed code is a new cache entry"


def test_regress_kwargs_for_a_results_side_are_refused(user, evaluated, capsys):
    code = main(["regress", "--policy", str(evaluated), "--policy-kwargs", "{}", "--baseline", str(evaluated),
                 "--baseline-kwargs", '{"a": 1}'])
    assert code == 2
    assert "--baseline-kwargs applies to a policy" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pytest fixture
FIXTURE_TEST = '''
import importlib.util
import json

SUITE = {suite!r}
SPEC = {spec!r}


def test_spec_and_object_give_the_same_results(steerloop_evaluate):
    by_spec = steerloop_evaluate(SPEC, SUITE, resolution=(16, 32), policy_kwargs={kwargs!r})
    module_spec = importlib.util.spec_from_file_location("users_driver", {driver!r})
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    by_object = steerloop_evaluate(module.load(**{kwargs!r}), SUITE, resolution=(16, 32))
    assert by_object.data["scenarios"] == by_spec.data["scenarios"]
    assert by_object.aggregate == by_spec.aggregate
    assert steerloop_evaluate(SPEC, SUITE, resolution=(16, 32), policy_kwargs={kwargs!r}) is by_spec
    expected = json.loads(open({expected!r}).read())
    assert by_spec.data["scenarios"] == expected["scenarios"]
'''


@pytest.mark.slow  # worker processes / a pytest subprocess: ~15 s each on 2 busy cores
def test_the_pytest_fixture_takes_a_spec_or_an_object(user, evaluated, pytester):
    pytester.makepyfile(test_mine=FIXTURE_TEST.format(suite=str(user / "suite.json"), spec=spec_of(user),
                                                      kwargs=KWARGS, driver=str(user / "driver.py"),
                                                      expected=str(evaluated / "results.json")))
    out = pytester.path / "results"
    result = pytester.runpytest_subprocess("--steerloop-out", str(out), "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=1)
    assert sorted(p.name.split("-")[0] for p in out.iterdir()) == ["ModelPolicy", f"{user.name}_driver.py_load"]


def test_the_fixtures_evaluator_takes_a_spec_or_an_object(user, evaluated, tmp_path):
    from steerloop.evaluation.regress import PolicyEvaluator

    evaluator = PolicyEvaluator(tmp_path / "cache")  # what the steerloop_evaluate fixture returns
    suite = user / "suite.json"
    by_spec = evaluator(spec_of(user), suite, resolution=RESOLUTION, policy_kwargs=KWARGS)
    by_object = evaluator(user_object(user, **KWARGS), suite, resolution=RESOLUTION)
    expected = json.loads((evaluated / "results.json").read_text())
    assert by_spec.data["scenarios"] == by_object.data["scenarios"] == expected["scenarios"]
    assert evaluator(spec_of(user), suite, resolution=RESOLUTION, policy_kwargs=KWARGS) is by_spec
    assert by_object.policy == "ModelPolicy" and by_spec.policy == spec_of(user)


# ----------------------------------------------------------------------------- the study
STUDY = """
[study]
name = "users"
resolution = [16, 32]
suites = ["suite.json"]
offline_data = "val"

[datasets.val]
track = "short.json"
episodes = 1

[policies.mine]
policy = "driver.py:load"
kwargs = {{ seed = {seed} }}

[policies.mine-s1]
policy = "driver.py:load"
kwargs = {{ seed = 1 }}
family = "mine"
"""


@pytest.mark.slow  # ~12 s: a whole study
def test_a_study_evaluates_user_policies_offline_and_in_closed_loop(user, evaluated, dataset, capsys):
    config = user / "study.toml"
    config.write_text(STUDY.format(seed=KWARGS["seed"]))
    out = user / "study-out"
    assert main(["study", "--config", str(config), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "| mine | user | user | n/a |" in report and "| mine-s1 | mine | user | n/a |" in report
    summary = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in summary["policies"]] == ["mine", "mine-s1"]
    (closed,) = out.glob("closed_loop/mine-??????????/tiny/results.json")
    data = json.loads(closed.read_text())
    expected = json.loads((evaluated / "results.json").read_text())
    assert data["scenarios"] == expected["scenarios"] and data["aggregate"] == expected["aggregate"]
    (offline,) = out.glob("offline/mine-??????????/offline.json")
    assert json.loads(offline.read_text())["model"] == evaluate_offline(
        spec_of(user), str(next(out.glob("datasets/val-*"))), policy_kwargs=KWARGS)["model"]
    capsys.readouterr()
    assert main(["study", "--config", str(config), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["study", "--config", str(config), "--out", str(out), "--workers", "1", "--quiet",
                 "--no-cache"]) == 0
    assert "4 to run" in capsys.readouterr().out  # offline + closed loop of both user policies


def test_a_study_with_a_broken_user_policy_fails_before_any_stage(user, tmp_path, capsys):
    config = user / "broken-study.toml"
    config.write_text(STUDY.format(seed=0).replace('"driver.py:load"\nkwargs = { seed = 0 }', '"broken.py:load"'))
    assert main(["study", "--config", str(config), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "[policies.mine]: policy" in err and "No module named 'no_such_package_for_steerloop'" in err
    assert not (tmp_path / "s" / "datasets").exists()


# ----------------------------------------------------------------------------- DAgger recording and drive
def test_record_with_a_user_learner_lets_it_drive(user, tmp_path):
    out = tmp_path / "dagger"
    assert main(["record", "--out", str(out), "--episodes", "1", "--track", str(user / "short.json"),
                 "--resolution", RES, "--learner", spec_of(user), "--learner-kwargs", json.dumps(KWARGS),
                 "--beta", "0", "--quiet"]) == 0
    log = DrivingLog(out)
    episode = log.read_episode(0)
    predicted = replay(user_object(user, **KWARGS), log, 0)
    np.testing.assert_array_equal(episode["steering"], np.clip(predicted, -1, 1))  # the learner drove every step
    assert not np.allclose(episode["steering"], episode["expert_steering"])


def test_drive_a_user_policy(user, capsys):
    assert main(["drive", "--policy", spec_of(user), "--policy-kwargs", json.dumps(KWARGS), "--track",
                 str(user / "short.json"), "--resolution", RES, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"] == spec_of(user) and summary["steps"] > 0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("attr, kwargs, message", [
    ("Bad", {"mode": "shape"}, r"on scenario tiny-00-short-default: predict returned actions of shape \(1, 2\); "
                               r"expected \(1, 1\)"),
    ("Bad", {"mode": "dtype"}, r"predict returned actions of dtype int32; expected float32"),
    ("Bad", {"mode": "nan", "after": 30}, r"on scenario tiny-00-short-default: predict returned a non-finite steering "
                                          r"command \(nan\)"),
    ("Bad", {"mode": "raise", "after": 5}, r"predict raised RuntimeError: CUDA out of memory"),
    ("NoPredict", {}, r"NoPredict does not satisfy the steerloop policy protocol: it has no predict\(\) method"),
    ("missing", {}, r"has no attribute 'missing'"),
])
def test_a_bad_policy_is_one_line_exit_2_and_nothing_written(user, tmp_path, capsys, attr, kwargs, message):
    out = tmp_path / "out"
    code = main(["evaluate", "--policy", spec_of(user, attr), "--policy-kwargs", json.dumps(kwargs), "--suite",
                 str(user / "suite.json"), "--out", str(out), "--resolution", RES, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"steerloop evaluate: policy '{spec_of(user, attr)}'"), err
    assert __import__("re").search(message, err), err
    assert not out.exists(), "a failed run leaves nothing in its output directory"


@pytest.mark.slow  # worker processes / a pytest subprocess: ~15 s each on 2 busy cores
def test_a_policy_failing_in_a_worker_removes_the_runs_files(user, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["evaluate", "--policy", spec_of(user, "Bad"), "--policy-kwargs", '{"mode": "nan", "after": 40}',
                 "--suite", str(user / "suite.json"), "--out", str(out), "--resolution", RES, "--quiet",
                 "--workers", "2"])
    assert code == 2 and "predict returned a non-finite steering command" in capsys.readouterr().err
    assert not out.exists()


def test_a_module_that_does_not_import_is_exit_2(user, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["evaluate", "--policy", f"{user / 'broken.py'}:load", "--suite", "smoke", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "ModuleNotFoundError: No module named 'no_such_package_for_steerloop'" in err and not out.exists()


def test_a_bad_learner_is_exit_2_before_any_file(user, tmp_path, capsys):
    out = tmp_path / "dagger"
    code = main(["record", "--out", str(out), "--episodes", "1", "--track", str(user / "short.json"),
                 "--resolution", RES, "--learner", spec_of(user, "NoPredict"), "--beta", "0", "--quiet"])
    assert code == 2 and "has no predict() method" in capsys.readouterr().err and not out.exists()
    code = main(["record", "--out", str(out), "--episodes", "1", "--track", str(user / "short.json"),
                 "--resolution", RES, "--learner", spec_of(user, "Bad"), "--learner-kwargs", '{"mode": "nan"}',
                 "--beta", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "on episode 0 (track short): predict returned a non-finite" in err, err
    assert not out.exists(), "no empty dataset is left behind"


def test_bad_policy_kwargs_json_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--policy", "x.py:p", "--policy-kwargs", "[1]", "--out", "unused"])
    assert exit_.value.code == 2
    assert "--policy-kwargs: must be a JSON object" in capsys.readouterr().err


# ----------------------------------------------------------------------------- no probing
def test_evaluation_and_training_never_probe_policies_with_hasattr_or_getattr():
    probes = []
    for package in ("evaluation", "training"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                        and node.func.id in ("hasattr", "getattr"):
                    target = ast.unparse(node.args[0])
                    if target != "self":  # an object reading its own fields is not probing a policy
                        probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not probes, "use steerloop.agents.protocol.policy_capabilities instead:\n" + "\n".join(probes)


# ----------------------------------------------------------------------------- Ray
def test_ray_workers_re_create_a_spec_with_the_same_results(user, evaluated, tmp_path, ray_local):
    evaluate(spec_of(user), load_suite(str(user / "suite.json")), tmp_path / "ray", policy_kwargs=KWARGS,
             workers=2, backend="ray", resolution=RESOLUTION, progress=False)
    same_results(evaluated, tmp_path / "ray")


def test_a_policy_failing_in_a_ray_task_is_one_line(user, tmp_path, ray_local):
    with pytest.raises(PolicyError) as error:
        evaluate(spec_of(user, "Bad"), load_suite(str(user / "suite.json")), tmp_path / "ray",
                 policy_kwargs={"mode": "raise"}, workers=2, backend="ray", resolution=RESOLUTION, progress=False)
    assert str(error.value).startswith(f"policy '{spec_of(user, 'Bad')}' on scenario tiny-0")
    assert "\n" not in str(error.value) and "predict raised RuntimeError: CUDA out of memory" in str(error.value)
    assert not (tmp_path / "ray").exists()
