"""A crafted stable-baselines3 ``.zip`` runs nothing: steerloop supplies every pickled entry of
its JSON ``data`` from known-good values (or refuses the file) and never unpickles one, through
every command that loads a zip. The payloads are real: SB3's own ``json_to_data`` and
``torch.load(weights_only=False)`` run them (positive controls)."""

from __future__ import annotations

import base64
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3
import torch
from stable_baselines3.common.save_util import json_to_data

import steerloop.sim  # noqa: F401  (registers the env)
from steerloop.agents import load_policy
from steerloop.agents.sb3 import lanekeep_action_space, lanekeep_observation_space, safe_sb3_load
from steerloop.evaluation.cli import main
from steerloop.training.rl import RLConfig, train_rl

from helpers import SHORT_SPEC

SB3_MIN = (36, 64)  # SB3's NatureCNN needs images of at least 36x36
RUN = {"resolution": SB3_MIN, "track_length": 60.0, "tracks": 3, "n_steps": 32, "batch_size": 32,
       "save_every": 32}  # train-rl CLI flags


class Touch:
    """Unpickling this creates ``marker``: what a crafted zip could do with any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload(marker: Path) -> str:
    return base64.b64encode(pickle.dumps(Touch(marker))).decode()


def rewrite(src: Path, dst: Path, edit_data=None, members: dict[str, bytes] | None = None) -> Path:
    """A copy of the zip ``src`` with its JSON ``data`` edited in place and members replaced."""
    with zipfile.ZipFile(src) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(contents["data"])
    if edit_data is not None:
        edit_data(data)
    contents["data"] = json.dumps(data, indent=4).encode()
    contents.update(members or {})
    with zipfile.ZipFile(dst, "w") as archive:
        for name, content in contents.items():
            archive.writestr(name, content)
    return dst


def poison(data: dict, markers: Path) -> None:
    """Swap the pickle of every serialised entry for a payload creating ``markers/<key>``,
    keeping the readable fields SB3 wrote beside it."""
    for key, entry in data.items():
        if isinstance(entry, dict) and ":serialized:" in entry:
            entry[":serialized:"] = payload(markers / key)


def extra_key(data: dict, markers: Path) -> None:
    poison(data, markers)
    data["evil"] = {":type:": "<class 'builtins.object'>", ":serialized:": payload(markers / "evil")}


def train(algorithm: str, path: Path, resolution=SB3_MIN) -> Path:
    env = gym.make("steerloop/LaneKeep-v0", track=SHORT_SPEC, resolution=resolution)
    if algorithm == "RecurrentPPO":
        from sb3_contrib import RecurrentPPO as cls
    else:
        cls = getattr(stable_baselines3, algorithm)
    on_policy = algorithm in ("PPO", "A2C", "RecurrentPPO")
    kwargs = {"n_steps": 8} if on_policy else {"buffer_size": 16, "learning_starts": 100}  # off-policy: no updates
    if algorithm in ("PPO", "RecurrentPPO"):
        kwargs.update(batch_size=8, n_epochs=1)
    model = cls("MultiInputLstmPolicy" if algorithm == "RecurrentPPO" else "MultiInputPolicy", env, seed=0,
                device="cpu", **kwargs)
    model.learn(8)
    model.save(path)
    env.close()
    return path


@pytest.fixture(scope="module")
def ppo_zip(tmp_path_factory) -> Path:
    return train("PPO", tmp_path_factory.mktemp("sb3") / "ppo.zip")


@pytest.fixture
def markers(tmp_path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


def observations(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (*SB3_MIN, 3), dtype=np.uint8),
             "speed": rng.uniform(0, 15, 1).astype(np.float32)} for _ in range(n)]


def actions(model, recurrent: bool) -> np.ndarray:
    out, state = [], None
    for t, obs in enumerate(observations()):
        action, state = model.predict(obs, state=state, episode_start=np.array([t == 0]), deterministic=True)
        out.append(action)
    return np.array(out)


# ----------------------------------------------------------------------------- benign files
@pytest.mark.parametrize("algorithm", ["PPO", "A2C", "SAC", "TD3", "RecurrentPPO"])
def test_benign_zip_predicts_exactly_as_sb3s_own_load(tmp_path, one_thread, algorithm):
    path = train(algorithm, tmp_path / f"{algorithm}.zip")
    model, name = safe_sb3_load(path)
    assert name == algorithm
    reference = type(model).load(path, device="cpu")
    recurrent = algorithm == "RecurrentPPO"
    np.testing.assert_array_equal(actions(model, recurrent), actions(reference, recurrent))
    assert str(model.observation_space) == str(reference.observation_space)
    if algorithm == "A2C":  # its optimizer class comes from the serialised policy_kwargs
        assert type(model.policy.optimizer) is type(reference.policy.optimizer) is torch.optim.RMSprop


def test_weights_are_read_with_weights_only(ppo_zip, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append((sys._getframe(1).f_globals["__name__"], kwargs.get("weights_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    safe_sb3_load(ppo_zip)
    by_sb3 = [flag for module, flag in calls if module == "stable_baselines3.common.save_util"]
    assert by_sb3 == [True, True, True]  # policy.pth, policy.optimizer.pth, pytorch_variables.pth
    assert all(flag is True for _, flag in calls)


def test_supplied_spaces_are_the_envs(make_env):
    env = make_env(resolution=SB3_MIN)
    assert lanekeep_observation_space(SB3_MIN) == env.observation_space
    assert lanekeep_action_space() == env.action_space


# ----------------------------------------------------------------------------- crafted files
def test_payloads_are_live_under_sb3s_own_deserialisation(ppo_zip, tmp_path, markers):
    evil = rewrite(ppo_zip, tmp_path / "evil.zip", lambda data: extra_key(data, markers))
    with zipfile.ZipFile(evil) as archive:
        json_to_data(archive.read("data").decode())
    assert {"observation_space", "action_space", "policy_class", "lr_schedule", "clip_range", "_last_obs",
            "evil"} <= {p.name for p in markers.iterdir()}


def test_poisoned_pickles_are_never_run_and_the_model_still_loads(ppo_zip, tmp_path, markers):
    evil = rewrite(ppo_zip, tmp_path / "evil.zip", lambda data: poison(data, markers))
    policy = load_policy(str(evil))
    reference = stable_baselines3.PPO.load(ppo_zip, device="cpu")
    assert list(markers.iterdir()) == []
    np.testing.assert_array_equal(actions(policy.model, False), actions(reference, False))


@pytest.mark.parametrize("key, edit", [
    ("evil", lambda data: data.update(evil={":type:": "<class 'object'>", ":serialized:": "x"})),
    ("policy_class", lambda data: data["policy_class"].update({"__module__": "posix",
                                                                 "__init__": "<function system.__init__ at 0x1>"})),
    ("observation_space", lambda data: data["observation_space"].update(
        spaces="{'image': Box(0, 255, (3, 36, 64), uint8), 'speed': Box(-5.0, 99.0, (1,), float32)}")),
    ("observation_space", lambda data: data.update(observation_space=None)),
    ("action_space", lambda data: data["action_space"].update(_shape=[2])),
    ("policy_kwargs.activation_fn", lambda data: data.update(policy_kwargs={
        ":type:": "<class 'dict'>", ":serialized:": "x", "activation_fn": "<function system at 0x1>"})),
    ("rollout_buffer_class", lambda data: data["rollout_buffer_class"].update(__module__="os")),
], ids=["unknown-key", "policy-class", "observation-space", "no-observation-space", "action-space",
        "policy-kwargs-class", "buffer-class"])
def test_entries_that_cannot_be_supplied_are_refused_by_name(ppo_zip, tmp_path, markers, key, edit):
    def craft(data):
        poison(data, markers)
        edit(data)

    evil = rewrite(ppo_zip, tmp_path / "evil.zip", craft)
    with pytest.raises(ValueError, match=f"evil.zip: refusing .*'{key}'") as error:
        load_policy(str(evil))
    assert "\n" not in str(error.value)
    assert list(markers.iterdir()) == []


def test_a_pickle_in_the_weights_is_refused(ppo_zip, tmp_path, markers):
    buffer = io.BytesIO()
    torch.save({"weight": Touch(markers / "pth")}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # positive control: the payload is live
    assert (markers / "pth").exists()
    (markers / "pth").unlink()
    evil = rewrite(ppo_zip, tmp_path / "evil.zip", members={"policy.pth": buffer.getvalue()})
    with pytest.raises(ValueError, match="could not load it as a PPO model .*UnpicklingError") as error:
        load_policy(str(evil))
    assert "\n" not in str(error.value) and list(markers.iterdir()) == []


@pytest.mark.parametrize("member, content", [
    ("policy.__class__.pth", None),
    ("pytorch_variables.pth", {"policy.__class__": torch.zeros(1)}),
], ids=["member-name", "variable-name"])
def test_weights_go_only_to_plain_attribute_paths(ppo_zip, tmp_path, member, content):
    with zipfile.ZipFile(ppo_zip) as archive:
        weights = archive.read("policy.pth")
    buffer = io.BytesIO()
    torch.save(content, buffer)
    evil = rewrite(ppo_zip, tmp_path / "evil.zip", members={member: weights if content is None else buffer.getvalue()})
    with pytest.raises(ValueError, match="refusing .*weights named .*__class__.* not a plain model attribute path"):
        load_policy(str(evil))


def test_weights_must_fit_the_recorded_spaces(ppo_zip, tmp_path):
    other = train("PPO", tmp_path / "other.zip", resolution=(48, 64))  # NatureCNN flattens 2x5x64, not 1x5x64
    with zipfile.ZipFile(other) as archive:
        weights = archive.read("policy.pth")
    mixed = rewrite(ppo_zip, tmp_path / "mixed.zip", members={"policy.pth": weights})
    with pytest.raises(ValueError, match="could not load it as a PPO model .*size mismatch"):
        load_policy(str(mixed))


# ----------------------------------------------------------------------------- train-rl resume
def run_dir(tmp_path: Path, checkpoint: Path, timesteps: int = 64) -> RLConfig:
    """A train-rl run directory whose newest checkpoint is ``checkpoint``."""
    cfg = RLConfig(out=str(tmp_path / "run"), timesteps=timesteps, **RUN)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"run": cfg.run_config(), "extra": {}}))
    (tmp_path / "run" / "checkpoints" / "ppo_32_steps.zip").write_bytes(checkpoint.read_bytes())
    return cfg


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """A PPO checkpoint made by train-rl with the RUN flags (32 steps)."""
    out = tmp_path_factory.mktemp("rl") / "run"
    train_rl(RLConfig(out=str(out), timesteps=32, **RUN), progress=False)
    return out / "checkpoints" / "ppo_32_steps.zip"


def test_resume_from_a_poisoned_checkpoint_trains_on_without_running_it(run_checkpoint, tmp_path, markers):
    evil = rewrite(run_checkpoint, tmp_path / "evil.zip", lambda data: poison(data, markers))
    summary = train_rl(run_dir(tmp_path, evil), progress=False)
    assert summary["timesteps"] == 64 and list(markers.iterdir()) == []


def test_resume_refuses_a_schedule_it_cannot_read(run_checkpoint, tmp_path, markers):
    def opaque_clip_range(data):
        poison(data, markers)
        data["clip_range"] = {":type:": "<class 'function'>", ":serialized:": payload(markers / "clip")}

    evil = rewrite(run_checkpoint, tmp_path / "evil.zip", opaque_clip_range)
    with pytest.raises(ValueError, match="'clip_range' is a .*function.* schedule whose value is not readable"):
        train_rl(run_dir(tmp_path, evil), progress=False)
    assert list(markers.iterdir()) == []
    load_policy(str(evil))  # prediction never uses clip_range: a harmless constant is supplied
    assert list(markers.iterdir()) == []


# ----------------------------------------------------------------------------- every command
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerloop", *args], capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    """stderr without pybullet's import banner (printed by its C module, not by steerloop)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("pybullet build time")]


@pytest.fixture(scope="module")
def crafted(ppo_zip, tmp_path_factory) -> tuple[Path, Path]:
    """(evil.zip, markers): every pickled entry poisoned, plus an extra pickled entry, beside the
    files the commands need (a short track, a one-track suite)."""
    root = tmp_path_factory.mktemp("crafted")
    markers = root / "markers"
    markers.mkdir()
    (root / "short.json").write_text(json.dumps(SHORT_SPEC))
    (root / "tiny.json").write_text(json.dumps({"name": "tiny", "tracks": ["short.json"]}))
    return rewrite(ppo_zip, root / "evil.zip", lambda data: extra_key(data, markers)), markers


COMMANDS = {
    "evaluate": ["evaluate", "--policy", "{evil}", "--suite", "{root}/tiny.json", "--out", "{root}/eval",
                 "--resolution", "36x64", "--quiet"],
    "offline": ["offline", "--policy", "{evil}", "--data", "{root}/no-data"],
    "regress-policy": ["regress", "--policy", "{evil}", "--baseline", "zeros", "--suite", "{root}/tiny.json",
                       "--out", "{root}/regress", "--resolution", "36x64", "--quiet"],
    "regress-baseline": ["regress", "--policy", "zeros", "--baseline", "{evil}", "--suite", "{root}/tiny.json",
                         "--out", "{root}/regress-b", "--resolution", "36x64", "--quiet"],
    "record-learner": ["record", "--out", "{root}/dagger", "--episodes", "1", "--track", "{root}/short.json",
                       "--resolution", "36x64", "--learner", "{evil}", "--beta", "0.5", "--quiet"],
    "drive": ["drive", "--policy", "{evil}", "--track", "{root}/short.json", "--resolution", "36x64"],
    "train-rl-init": ["train-rl", "--out", "{root}/rl-init", "--init", "{evil}", "--resolution", "36x64", "--quiet"],
}


def test_the_command_line_refuses_the_crafted_zip_in_one_line(crafted):
    evil, markers = crafted
    result = cli(*[arg.format(evil=evil, root=evil.parent) for arg in COMMANDS["evaluate"]])
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "evil.zip: refusing" in result.stderr and "'evil'" in result.stderr
    assert list(markers.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_the_crafted_zip_without_running_it(crafted, capsys, command):
    evil, markers = crafted
    code = main([arg.format(evil=evil, root=evil.parent) for arg in COMMANDS[command]])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert len(error_lines(stderr)) == 1 and "evil.zip" in stderr, stderr
    if command != "train-rl-init":  # --init takes a behaviour-cloning checkpoint directory only
        assert "'evil'" in stderr
    assert list(markers.iterdir()) == []
    if command == "record-learner":
        assert not (evil.parent / "dagger").exists()  # refused before any file is made


def test_train_rl_resume_refuses_the_crafted_checkpoint_without_running_it(crafted, tmp_path, capsys):
    evil, markers = crafted
    cfg = run_dir(tmp_path, evil)
    code = main(["train-rl", "--out", cfg.out, "--timesteps", "64", "--resolution", "36x64", "--track-length", "60",
                 "--tracks", "3", "--n-steps", "32", "--batch-size", "32", "--save-every", "32", "--quiet"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert len(error_lines(stderr)) == 1 and "ppo_32_steps.zip: refusing" in stderr and "'evil'" in stderr, stderr
    assert list(markers.iterdir()) == []
    assert sorted(p.name for p in Path(cfg.out).iterdir()) == ["checkpoints", "config.json"]  # nothing written
