"""The PPO baseline (training.rl and ``steerloop train-rl``): a tiny real training run through
the command line, resume, RecurrentPPO, distillation of a behaviour-cloning checkpoint,
and the resulting .zip evaluated like any other policy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from steerloop.agents import load_policy
from steerloop.agents.checkpoint import save_checkpoint
from steerloop.agents.models import ModelConfig, build_model
from steerloop.agents.preprocess import PreprocessConfig
from steerloop.evaluation.runner import evaluate, run_scenario
from steerloop.evaluation.suites import Scenario, Suite
from steerloop.training.rl import RL_INSTALL_HINT, RLConfig, _actor_and_value, collect_teacher_frames, distil_checkpoint, train_rl

from helpers import SHORT_SPEC

SMALL = (36, 64)  # SB3's NatureCNN needs at least 36x36
TINY_RUN = {"resolution": SMALL, "track_length": 60.0, "tracks": 3, "n_steps": 32, "batch_size": 32,
            "save_every": 32}


def cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerloop", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bc_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(arch="pilotnet", preprocess=PreprocessConfig(crop_top=8, resize=(20, 40)))
    return str(save_checkpoint(tmp_path_factory.mktemp("bc") / "ckpt", build_model(config), config))


@pytest.mark.slow  # ~10 s; the recurrent-PPO test below covers train-rl in the default suite
def test_cli_trains_ppo_on_two_subprocess_envs_and_the_zip_is_evaluated(tmp_path):
    out = tmp_path / "ppo"
    result = cli("train-rl", "--algo", "ppo", "--out", str(out), "--timesteps", "256", "--envs", "2",
                 "--resolution", "36x64", "--n-steps", "64", "--track-length", "60", "--tracks", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "steerloop evaluate --policy" in result.stdout and "--resolution 36x64" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "PPO" and summary["timesteps"] == 256
    assert (out / "checkpoints" / "ppo_0_steps.zip").is_file() and (out / "model.zip").is_file()

    policy = load_policy(str(out / "model.zip"))
    assert policy.describe()["algorithm"] == "PPO" and policy.image_size == SMALL
    suite = Suite("short", (Scenario(name="short", track=SHORT_SPEC),))
    results = evaluate(str(out / "model.zip"), suite, tmp_path / "eval", resolution=SMALL, progress=False,
                       plots=False)
    assert results["scenarios"][0]["metrics"]["steps"] > 0
    with pytest.raises(ValueError, match="--resolution 36x64"):
        evaluate(str(out / "model.zip"), suite, tmp_path / "eval-wrong", resolution=(66, 200), progress=False)


def test_rerun_continues_from_the_newest_checkpoint(tmp_path):
    cfg = RLConfig(out=str(tmp_path / "run"), timesteps=64, **TINY_RUN)
    assert train_rl(cfg, progress=False)["timesteps"] == 64
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["ppo_0_steps.zip", "ppo_32_steps.zip", "ppo_64_steps.zip"]
    (tmp_path / "run" / "checkpoints" / "ppo_64_steps.zip").unlink()  # as if killed before its last save
    summary = train_rl(RLConfig(out=str(tmp_path / "run"), timesteps=96, **TINY_RUN), progress=False)
    assert summary["timesteps"] == 96  # 32 from the checkpoint + 64 more, not 96 from scratch
    with pytest.raises(ValueError, match="different configuration"):
        train_rl(RLConfig(out=str(tmp_path / "run"), timesteps=96, seed=1, **TINY_RUN), progress=False)


def test_recurrent_ppo_from_a_bc_checkpoint_drives_with_its_lstm_state(tmp_path, bc_checkpoint):
    cfg = RLConfig(out=str(tmp_path / "rppo"), timesteps=32, recurrent=True, init=bc_checkpoint,
                   pretrain_steps=64, pretrain_epochs=1, **TINY_RUN)
    summary = train_rl(cfg, progress=False)
    assert summary["algorithm"] == "RecurrentPPO" and summary["distillation"]["frames"] == 64
    policy = load_policy(str(tmp_path / "rppo" / "model.zip"))
    assert policy.describe()["algorithm"] == "RecurrentPPO" and policy.recurrent
    obs = {"image": np.zeros((2, *SMALL, 3), np.uint8), "speed": np.full((2, 1), 10.0, np.float32)}
    action, state = policy.predict(obs, state=None, episode_start=np.ones(2, bool))
    assert action.shape == (2, 1) and state[0].shape[1] == 2  # (layers, envs, hidden) LSTM state
    metrics, trajectory = run_scenario(policy, Scenario(name="short", track=SHORT_SPEC), resolution=SMALL)
    assert metrics["steps"] == len(trajectory["steering"]) > 0


@pytest.mark.parametrize("recurrent", [False, True], ids=["ppo", "recurrent-ppo"])
def test_distillation_fits_the_actor_to_the_bc_labels(tmp_path, bc_checkpoint, recurrent):
    from steerloop.training.rl import _algorithm, _vec_env

    torch.manual_seed(0)
    cfg = RLConfig(out=str(tmp_path), init=bc_checkpoint, recurrent=recurrent, pretrain_steps=64, pretrain_epochs=8,
                   **TINY_RUN)
    data = collect_teacher_frames(cfg, progress=False)
    teacher = load_policy(bc_checkpoint)
    first, _ = teacher.predict({"image": data["image"][0], "speed": data["speed"][0]})
    np.testing.assert_array_equal(data["labels"][0], first)  # labels are the clean teacher command
    algorithm, policy_name = _algorithm(cfg)
    venv = _vec_env(cfg)
    model = algorithm(policy_name, venv, n_steps=32, batch_size=32, seed=0, device="cpu")

    def actor_mse() -> float:
        obs, _ = model.policy.obs_to_tensor({"image": data["image"], "speed": data["speed"]})
        with torch.no_grad():
            mean, _ = _actor_and_value(model.policy, obs, data["starts"] | (np.arange(64) == 0), recurrent)
        return float(((mean.numpy() - data["labels"]) ** 2).mean())

    before = actor_mse()
    losses = distil_checkpoint(model, cfg, data, progress=False)
    venv.close()
    assert actor_mse() < before / 4
    assert np.isfinite(losses["value_mse"])


def test_missing_sb3_contrib_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sb3_contrib", None)
    with pytest.raises(ValueError, match="steerloop\\[rl\\]"):
        RLConfig(out=str(tmp_path), recurrent=True)
    assert RL_INSTALL_HINT == 'pip install "steerloop[rl]"'


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="^algo must"):
        RLConfig(algo="sac")
    with pytest.raises(ValueError, match="^envs must"):
        RLConfig(envs=0)
    with pytest.raises(ValueError, match="36x36"):
        RLConfig(resolution=(16, 32))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("not a run")
    with pytest.raises(ValueError, match="not a train-rl run"):
        train_rl(RLConfig(out=str(tmp_path / "other"), **TINY_RUN), progress=False)
