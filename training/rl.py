"""Reinforcement-learning baseline (``steerloop train-rl``): PPO from stable-baselines3.

PPO learns to steer in closed loop from the camera image and the speed (the env's
``Dict`` observation, hence SB3's ``MultiInputPolicy``: NatureCNN on the image, an MLP on
the speed) and the env's reward (progress minus offset, heading, steering-rate, departure
and off-road penalties). Episodes run on training-split procedural tracks only; each
sub-environment of a ``SubprocVecEnv`` (forkserver) draws its routes from the first
``tracks`` training tracks with its own seed (``seed + i``). ``--recurrent`` uses
RecurrentPPO from sb3-contrib (``MultiInputLstmPolicy``; the ``steerloop[rl]`` extra).

Initialisation from a behaviour-cloning checkpoint (``--init``) distils it into the PPO
policy: the checkpoint drives training tracks with PPO's initial exploration noise added
to its executed commands, its clean command is the label of every visited frame, and the
PPO actor's mean is regressed on those labels (MSE) while the value head is regressed on
the discounted returns observed; PPO then starts from that policy. (The architectures
differ, so no weights are copied.)

Output directory: ``model.zip`` (the final model, evaluated by ``steerloop evaluate
--policy OUT/model.zip``), ``checkpoints/<algo>_<N>_steps.zip`` (every ``save_every``
steps; an interrupted run continues from the newest, so at most ``save_every`` steps are
lost; it is loaded with ``steerloop.agents.sb3.safe_sb3_load``, which unpickles nothing),
``config.json`` (this run's configuration, compared on resume), ``summary.json`` and
TensorBoard scalars in ``tb/``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

from steerloop.files import atomic_write_json
from steerloop.sim import ENV_ID
from steerloop.sim.conditions import ConditionFile, check_conditions, read_condition_file
from steerloop.sim.track import check_route_length, split_seed

ALGOS = ("ppo",)
RL_INSTALL_HINT = 'pip install "steerloop[rl]"'
CHECKPOINTS = "checkpoints"
PRETRAIN_CHUNK = 64  # [steps] consecutive frames per pretraining batch (one sequence for the LSTM)


@dataclass
class RLConfig:
    """A PPO training run. Every field is a ``steerloop train-rl`` flag."""

    out: str = "runs/ppo"
    """Run directory (created, or resumed when it holds the same run)."""
    algo: str = "ppo"
    """Algorithm; only ppo (stable-baselines3 PPO, or sb3-contrib RecurrentPPO with ``recurrent``)."""
    timesteps: int = 100_000
    """Environment steps to train for in total (a re-run with a larger value trains on)."""
    envs: int = 1
    """Parallel environments (SubprocVecEnv with forkserver; 1 runs in this process)."""
    recurrent: bool = False
    """Use RecurrentPPO (an LSTM policy) from sb3-contrib."""
    init: str | None = None
    """A behaviour-cloning checkpoint to distil into the policy before PPO starts."""
    seed: int = 0
    """Seeds PPO, the environments (seed + i) and pretraining."""
    resolution: tuple[int, int] = (66, 200)
    """Camera image size (H, W) [px]; evaluate the model with the same --resolution."""
    track_length: float = 200.0
    """Length of the procedural training routes [m]."""
    tracks: int = 100
    """Routes are drawn from the first this many training-split tracks (each env builds a road once)."""
    conditions: tuple[str, ...] = ("default",)
    """Visual conditions, one drawn per episode."""
    condition_file: str | None = None
    """A JSON or TOML file of your own scenery/weather/camera values and named conditions (docs/world.md) that
    ``conditions`` may name (part of the run's identity by content hash)."""
    speed: float = 10.0
    """Cruise speed [m/s]."""
    n_steps: int = 512
    """Steps per environment between PPO updates."""
    batch_size: int = 64
    """PPO minibatch size."""
    n_epochs: int = 4
    """PPO epochs per update."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    gamma: float = 0.99
    """Discount factor."""
    log_std_init: float = -1.0
    """Initial log standard deviation of the Gaussian steering (std 0.37 of the [-1, 1] range)."""
    pretrain_steps: int = 4096
    """With ``init``: frames the checkpoint drives to label for distillation."""
    pretrain_epochs: int = 10
    """With ``init``: passes over those frames."""
    pretrain_lr: float = 1e-3
    """With ``init``: Adam learning rate of the distillation."""
    save_every: int = 10_000
    """Environment steps between resumable checkpoints."""
    threads: int = 1
    """torch threads of the learner process."""
    extra: dict = field(default_factory=dict)
    """Extra metadata stored in config.json."""

    def __post_init__(self):
        self.resolution = tuple(int(v) for v in self.resolution)
        self.conditions = tuple(self.conditions)
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        for name in ("timesteps", "envs", "tracks", "n_steps", "batch_size", "n_epochs", "save_every", "threads",
                     "pretrain_steps", "pretrain_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_route_length(self.track_length, "track_length")
        if self.tracks > 100_000:
            raise ValueError(f"tracks must be <= 100000 (the size of the training split), got {self.tracks}")
        check_conditions(self.conditions, self.condition_source)
        if min(self.resolution) < 36:
            raise ValueError(f"resolution must be at least 36x36 for SB3's NatureCNN, got "
                             f"{self.resolution[0]}x{self.resolution[1]}")
        if self.recurrent and importlib.util.find_spec("sb3_contrib") is None:
            raise ValueError(f"recurrent needs sb3-contrib (RecurrentPPO), which is not installed; install it "
                             f"with: {RL_INSTALL_HINT}")
        if not (0.0 < self.gamma <= 1.0 and self.learning_rate > 0 and self.pretrain_lr > 0):
            raise ValueError(f"need 0 < gamma <= 1 (got {self.gamma}) and positive learning rates "
                             f"(got {self.learning_rate}, {self.pretrain_lr})")

    @functools.cached_property
    def condition_source(self) -> ConditionFile | None:
        """``condition_file`` read once, in this process; sub-environments get its content with the config."""
        return read_condition_file(self.condition_file) if self.condition_file is not None else None

    def run_config(self) -> dict:
        """The fields that define the run (compared on resume); budget and threads may change. A
        condition file counts by its content hash and the values used, not its path."""
        config = asdict(self)
        for key in ("out", "timesteps", "save_every", "threads", "extra", "condition_file"):
            config.pop(key)
        config["resolution"], config["conditions"] = list(self.resolution), list(self.conditions)
        if self.condition_source is not None:
            config["condition_file"] = self.condition_source.identity(self.conditions)
        return config

    @property
    def prefix(self) -> str:
        return "recurrent_ppo" if self.recurrent else "ppo"


class TrainingTracks(gym.Wrapper):
    """Draws each episode's route from the first ``count`` training-split tracks, with a
    generator seeded by ``reset(seed=...)``; ``options["track"]`` still wins."""

    def __init__(self, env: gym.Env, count: int):
        super().__init__(env)
        self.count = count
        self.rng = np.random.default_rng()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        options = {"track": split_seed("train", int(self.rng.integers(self.count))), **(options or {})}
        return self.env.reset(seed=seed, options=options)


def make_training_env(cfg: RLConfig) -> gym.Env:
    """One training environment (picklable by reference, so SubprocVecEnv can build it)."""
    import steerloop.sim  # noqa: F401  (registers the env in a fresh subprocess)

    condition = cfg.conditions[0] if len(cfg.conditions) == 1 else cfg.conditions
    source = cfg.condition_source
    extra = {"condition_file": dict(source.content)} if source is not None else {}
    env = gym.make(ENV_ID, split="train", track_length=cfg.track_length, resolution=cfg.resolution,
                   speed=cfg.speed, condition=condition, **extra)
    return TrainingTracks(env, cfg.tracks)


def _algorithm(cfg: RLConfig):
    if cfg.recurrent:
        from sb3_contrib import RecurrentPPO

        return RecurrentPPO, "MultiInputLstmPolicy"
    from stable_baselines3 import PPO

    return PPO, "MultiInputPolicy"


def _vec_env(cfg: RLConfig):
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

    make = [functools.partial(make_training_env, cfg) for _ in range(cfg.envs)]
    venv = DummyVecEnv(make) if cfg.envs == 1 else SubprocVecEnv(make, start_method="forkserver")
    return VecMonitor(venv, info_keywords=("success",))


def latest_checkpoint(out: Path, prefix: str) -> tuple[Path, int] | None:
    """(path, steps) of the newest ``<prefix>_<N>_steps.zip`` in ``out/checkpoints``."""
    found = []
    for path in (out / CHECKPOINTS).glob(f"{prefix}_*_steps.zip"):
        match = re.fullmatch(rf"{prefix}_(\d+)_steps\.zip", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None
    steps, path = max(found)
    return path, steps


# ----------------------------------------------------------------------------- BC initialisation
def collect_teacher_frames(cfg: RLConfig, progress: bool = True) -> dict[str, np.ndarray]:
    """Drive the ``cfg.init`` checkpoint on training tracks with PPO's initial exploration
    noise on its executed command; returns observations, clean teacher labels, episode
    starts and discounted returns of ``cfg.pretrain_steps`` steps."""
    from tqdm import tqdm

    from steerloop.agents import load_policy
    from steerloop.agents.policy import LearnedPolicy

    teacher = load_policy(cfg.init)
    if not isinstance(teacher, LearnedPolicy):  # distillation needs the checkpoint's model configuration
        raise ValueError(f"init must be a behaviour-cloning checkpoint directory, got {cfg.init!r}")
    env = make_training_env(cfg)
    rng = np.random.default_rng([cfg.seed, 1])
    noise_std = float(np.exp(cfg.log_std_init))
    images, speeds, labels, starts, rewards, ends = [], [], [], [], [], []
    obs, _ = env.reset(seed=cfg.seed + 10_000)
    state, start = None, True
    try:
        for _ in tqdm(range(cfg.pretrain_steps), desc="label frames with the BC checkpoint", unit="frame",
                      disable=not progress, dynamic_ncols=True):
            action, state = teacher.predict(obs, state=state, episode_start=np.array([start]), deterministic=True)
            images.append(obs["image"])
            speeds.append(obs["speed"])
            labels.append(np.asarray(action, np.float32).reshape(1))
            starts.append(start)
            executed = np.clip(np.asarray(action, np.float32).reshape(1) + rng.normal(0.0, noise_std, 1), -1, 1)
            obs, reward, terminated, truncated, _ = env.step(executed.astype(np.float32))
            rewards.append(reward)
            ends.append(terminated or truncated)
            start = terminated or truncated
            if start:
                obs, _ = env.reset()
    finally:
        env.close()
    returns = np.zeros(len(rewards), np.float32)
    running = 0.0
    for t in reversed(range(len(rewards))):  # the last, unfinished episode is cut off (no bootstrap)
        running = rewards[t] + cfg.gamma * running * (not ends[t])
        returns[t] = running
    return {"image": np.stack(images), "speed": np.stack(speeds), "labels": np.stack(labels),
            "starts": np.asarray(starts), "returns": returns}


def _actor_and_value(policy, obs, starts, recurrent: bool):
    import torch

    if recurrent:
        zeros = torch.zeros(policy.lstm_hidden_state_shape)
        states = (zeros, zeros.clone())
        starts = torch.as_tensor(starts, dtype=torch.float32)
        distribution, _ = policy.get_distribution(obs, states, starts)
        values = policy.predict_values(obs, states, starts)
    else:
        distribution = policy.get_distribution(obs)
        values = policy.predict_values(obs)
    return distribution.distribution.mean, values.flatten()


def distil_checkpoint(model, cfg: RLConfig, data: dict[str, np.ndarray], progress: bool = True) -> dict:
    """Regress the PPO actor's mean on the teacher's labels and the value head on the
    observed returns, over chunks of ``PRETRAIN_CHUNK`` consecutive frames (each chunk
    starts the LSTM from zeros). Returns the final mean losses."""
    import torch
    from tqdm import tqdm

    policy = model.policy
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.pretrain_lr)
    n = len(data["labels"])
    chunks = [np.arange(i, min(i + PRETRAIN_CHUNK, n)) for i in range(0, n, PRETRAIN_CHUNK)]
    rng = np.random.default_rng([cfg.seed, 2])
    policy.set_training_mode(True)
    losses = {}
    for _ in tqdm(range(cfg.pretrain_epochs), desc="distil the BC checkpoint into PPO", unit="epoch",
                  disable=not progress, dynamic_ncols=True):
        sums = {"actor_mse": 0.0, "value_mse": 0.0}
        for k in rng.permutation(len(chunks)):
            idx = chunks[k]
            obs, _ = policy.obs_to_tensor({"image": data["image"][idx], "speed": data["speed"][idx]})
            starts = data["starts"][idx].copy()
            starts[0] = True
            mean, values = _actor_and_value(policy, obs, starts, cfg.recurrent)
            actor = torch.nn.functional.mse_loss(mean, torch.as_tensor(data["labels"][idx]))
            value = torch.nn.functional.mse_loss(values, torch.as_tensor(data["returns"][idx]))
            optimizer.zero_grad(set_to_none=True)
            (actor + value / max(float(np.var(data["returns"])), 1.0)).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            optimizer.step()
            sums["actor_mse"] += actor.item() * len(idx)
            sums["value_mse"] += value.item() * len(idx)
        losses = {key: value / n for key, value in sums.items()}
    policy.set_training_mode(False)
    return losses


# ----------------------------------------------------------------------------- training
def _callbacks(cfg: RLConfig, out: Path, progress: bool):
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
    from tqdm import tqdm

    class ProgressBar(BaseCallback):
        """Environment steps with rate and ETA; recent mean return and success rate."""

        def _on_training_start(self) -> None:
            self.bar = tqdm(total=cfg.timesteps, initial=min(self.model.num_timesteps, cfg.timesteps), unit="step",
                            desc=f"train-rl {cfg.prefix}", disable=not progress, dynamic_ncols=True)

        def _on_step(self) -> bool:
            self.bar.update(min(self.model.num_timesteps, cfg.timesteps) - self.bar.n)
            episodes = self.model.ep_info_buffer
            if episodes and self.n_calls % 50 == 0:
                self.bar.set_postfix(ret=f"{np.mean([e['r'] for e in episodes]):.1f}",
                                     success=f"{np.mean([e['success'] for e in episodes]):.2f}")
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    saver = CheckpointCallback(save_freq=max(cfg.save_every // cfg.envs, 1), save_path=str(out / CHECKPOINTS),
                               name_prefix=cfg.prefix)
    return [saver, ProgressBar()]


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def train_rl(cfg: RLConfig, progress: bool = True) -> dict:
    """Train (or resume) PPO into ``cfg.out``; returns a summary (also in summary.json)."""
    import torch

    from steerloop.agents.sb3 import safe_sb3_load

    out = Path(cfg.out)
    config_file = out / "config.json"
    if config_file.exists():
        previous = json.loads(config_file.read_text())
        recorded = (previous.get("run") or {}).get("condition_file") or {}
        source = cfg.condition_source
        if source is not None and recorded.get("sha256") not in (None, source.sha256):
            raise ValueError(f"condition file {source.path}: its content (sha256 {source.sha256[:12]}) is not what "
                             f"{out} was trained with (sha256 {recorded['sha256'][:12]}); restore that file to "
                             "resume, or use another directory for out")
        if previous.get("run") != cfg.run_config():
            raise ValueError(f"{out} holds a train-rl run with a different configuration ({config_file}); "
                             "use another directory for out (only timesteps, save_every and threads may change)")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} exists and is not a train-rl run directory; choose another directory")
    if cfg.init is not None and not Path(cfg.init).is_dir():
        raise ValueError(f"init {cfg.init}: no behaviour-cloning checkpoint directory there")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(config_file, {"run": cfg.run_config(), "extra": cfg.extra})
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"seconds": 0.0}

    torch.set_num_threads(cfg.threads)
    algorithm, policy_name = _algorithm(cfg)
    started = time.perf_counter()
    venv = _vec_env(cfg)
    try:
        latest = latest_checkpoint(out, cfg.prefix)
        if latest is not None:
            model, _ = safe_sb3_load(latest[0], "RecurrentPPO" if cfg.recurrent else "PPO", env=venv,
                                     tensorboard_log=str(out / "tb"))  # never unpickles from the zip
        else:
            model = algorithm(policy_name, venv, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
                              n_epochs=cfg.n_epochs, learning_rate=cfg.learning_rate, gamma=cfg.gamma,
                              seed=cfg.seed, device="cpu", tensorboard_log=str(out / "tb"),
                              policy_kwargs={"log_std_init": cfg.log_std_init})
            if cfg.init is not None:
                data = collect_teacher_frames(cfg, progress)
                losses = distil_checkpoint(model, cfg, data, progress)
                summary["distillation"] = {"frames": len(data["labels"]), **losses}
            (out / CHECKPOINTS).mkdir(exist_ok=True)
            model.save(out / CHECKPOINTS / f"{cfg.prefix}_0_steps.zip")
        remaining = cfg.timesteps - model.num_timesteps
        if remaining > 0:
            model.learn(remaining, callback=_callbacks(cfg, out, progress), reset_num_timesteps=False,
                        tb_log_name=cfg.prefix)
        model.save(out / "model.zip")
        episodes = list(model.ep_info_buffer)
    finally:
        venv.close()
    summary.update({
        "model": str(out / "model.zip"), "algorithm": "RecurrentPPO" if cfg.recurrent else "PPO",
        "timesteps": int(model.num_timesteps), "seconds": summary["seconds"] + time.perf_counter() - started,
        "recent_episodes": len(episodes),
        "recent_mean_return": float(np.mean([e["r"] for e in episodes])) if episodes else None,
        "recent_success_rate": float(np.mean([e["success"] for e in episodes])) if episodes else None,
        "resolution": list(cfg.resolution),
    })
    _write_json(summary_file, summary)
    return summary
