"""Record expert driving into a durable driving log (``steerloop record``).

The episode -> (track, condition, seeds) assignment is a pure function of the command's
arguments (:func:`episode_jobs`), so a dataset's content is identical whatever the number
of worker processes. Workers simulate; only the parent process writes files, so the
manifest has a single writer. Completed episodes survive any interruption and a re-run
of the same command records only the missing ones, and again any listed episode whose file
is missing or no longer matches the manifest's size and sha256 (content is deterministic, so
the re-recorded bytes equal the original ones); the summary names them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from steerloop.agents.experts import NOISE_KINDS, ExpertPolicy, NoisyExpert
from steerloop.agents.mixture import MixturePolicy
from steerloop.agents.protocol import PolicyError, checked_predict
from steerloop.sim.controllers import CONTROLLERS, DEFAULT_EXPERT
from steerloop.sim.env import LaneKeepEnv, load_track
from steerloop.driving_log import MANIFEST, DrivingLogWriter, EpisodeBuffer, LogError, episode_file
from steerloop.parallel import check_backend, connect_ray, run_tasks
from steerloop.sim.conditions import BUILTIN, ConditionFile, check_conditions, read_condition_file, world_digest
from steerloop.sim.track import SPLIT_SEED_RANGES, check_route_length, split_seed

SUITES = tuple(SPLIT_SEED_RANGES)  # train, val, test
MAX_EPISODE_STEPS = 3000  # [control steps] safety cap per episode (150 s at 20 Hz)


@dataclass
class RecordConfig:
    """What to record. Everything here (except ``out``, ``workers``, ``backend``, ``address`` and ``extra``)
    defines the dataset."""

    out: str = "data/expert"
    """Dataset directory (created, or resumed when it holds the same recording)."""
    episodes: int = 20
    """Number of episodes."""
    suite: str = "train"
    """Track split the episodes' procedural tracks come from: train, val or test."""
    seed: int = 0
    """Master seed; episode i uses seeds derived from (seed, i)."""
    track: str | None = None
    """A JSON track spec path: record every episode on this track instead of the suite's."""
    track_length: float = 400.0
    """Length of procedural routes [m]."""
    noise: float = 0.0
    """DART noise scale (normalised steering) added to the executed command; 0 = clean expert."""
    noise_kind: str = "gaussian"
    """gaussian (i.i.d. per step) or ou (Ornstein-Uhlenbeck, temporally correlated)."""
    cameras: tuple[str, ...] = ("center",)
    """Cameras whose frames are stored each step."""
    conditions: tuple[str, ...] = ("default",)
    """Visual conditions, assigned to episodes in turn."""
    condition_file: str | None = None
    """A JSON or TOML file of your own scenery/weather/camera values and named conditions (docs/world.md) that
    ``conditions`` may name; its content hash and the values used are stored in the manifest."""
    resolution: tuple[int, int] = (66, 200)
    """Camera image size (H, W) [px]."""
    speed: float = 10.0
    """Cruise speed [m/s]."""
    expert: str = DEFAULT_EXPERT
    """Control law of the expert: stanley or pure_pursuit."""
    learner: str | None = None
    """DAgger: a policy spec (a checkpoint, ``.zip``, ``package.module:attr`` or ``file.py:attr``) that drives
    when the expert does not (the expert still labels every step)."""
    learner_kwargs: dict | None = None
    """DAgger: keyword arguments for a user learner's class or factory."""
    beta: float = 1.0
    """DAgger: probability that the expert drives (with a learner); 1 reproduces plain expert recording."""
    mixture: str = "step"
    """DAgger: flip the expert/learner coin every step or once per episode."""
    workers: int = 1
    """Episodes recorded at once, each worker with its own simulator (does not change the content)."""
    backend: str = "local"
    """Where episodes run: local (worker processes here) or ray (Ray tasks; same content)."""
    address: str | None = None
    """With backend ray: the cluster to use ("auto" or "HOST:PORT"); None starts a local Ray instance."""
    extra: dict = field(default_factory=dict)
    """Extra metadata stored in the manifest (e.g. who/what produced the data)."""

    def __post_init__(self):
        self.cameras = tuple(self.cameras)
        self.conditions = tuple(self.conditions)
        self.resolution = tuple(int(v) for v in self.resolution)
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        check_route_length(self.track_length, "track_length")  # before anything is built
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got {self.suite!r}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0 (normalised steering units), got {self.noise}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {self.noise_kind!r}")
        check_conditions(self.conditions, self.condition_source)
        if self.expert not in CONTROLLERS:
            raise ValueError(f"expert must be one of {sorted(CONTROLLERS)}, got {self.expert!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        check_backend(self.backend, self.address)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be within [0, 1], got {self.beta}")
        if self.learner is not None and self.noise > 0:
            raise ValueError("use either a learner (DAgger) or DART noise, not both")
        if self.learner_kwargs and self.learner is None:
            raise ValueError("learner_kwargs needs learner: the policy they are for")

    @functools.cached_property
    def condition_source(self) -> ConditionFile | None:
        """``condition_file`` read once (here, in the parent process); workers get its content with
        this config and never read the file again."""
        return read_condition_file(self.condition_file) if self.condition_file is not None else None

    def dataset_config(self) -> dict:
        """The fields that define the dataset's content (compared on resume). A condition file
        counts by its content hash and the values the conditions take from it, not its path;
        without one the dict is what it always was."""
        config = asdict(self)
        for key in ("out", "workers", "backend", "address", "extra", "condition_file"):
            config.pop(key)
        if self.condition_source is not None:
            config["condition_file"] = self.condition_source.identity(self.conditions)
        if not self.learner_kwargs:
            config.pop("learner_kwargs")  # datasets recorded before learner kwargs existed keep their identity
        config["cameras"], config["conditions"] = list(self.cameras), list(self.conditions)
        source = self.condition_source
        config["world"] = world_digest(self.conditions, source.conditions if source is not None else BUILTIN)
        config["resolution"] = list(self.resolution)
        if self.track is not None:
            config["track"] = load_track(self.track).to_spec()
        return config


@dataclass(frozen=True)
class EpisodeJob:
    """Everything one worker needs to record episode ``index`` deterministically."""

    index: int
    track: int | dict
    condition: str
    reset_seed: int
    noise_seed: int


def episode_jobs(cfg: RecordConfig) -> list[EpisodeJob]:
    """The fixed episode -> (track, condition, seeds) assignment of a recording command."""
    spec = load_track(cfg.track).to_spec() if cfg.track is not None else None
    jobs = []
    for index in range(cfg.episodes):
        rng = np.random.default_rng([cfg.seed, index])
        track_index = int(rng.integers(0, SPLIT_SEED_RANGES[cfg.suite][1] - SPLIT_SEED_RANGES[cfg.suite][0]))
        track = spec if spec is not None else split_seed(cfg.suite, track_index)
        jobs.append(EpisodeJob(index=index, track=track, condition=cfg.conditions[index % len(cfg.conditions)],
                               reset_seed=int(rng.integers(2**31)), noise_seed=int(rng.integers(2**31))))
    return jobs


_WORKER_ENV: dict = {}


def _worker_env(cfg: RecordConfig) -> LaneKeepEnv:
    """One simulator per process, reused across that process's episodes (built from the
    condition file's content that came with ``cfg``)."""
    source = cfg.condition_source
    key = (cfg.resolution, cfg.cameras, cfg.speed, cfg.expert, cfg.track_length, source and source.sha256)
    if key not in _WORKER_ENV:
        _WORKER_ENV.clear()
        _WORKER_ENV[key] = LaneKeepEnv(resolution=cfg.resolution, cameras=cfg.cameras, speed=cfg.speed,
                                       expert=cfg.expert, privileged=True, track_length=cfg.track_length,
                                       condition_file=dict(source.content) if source else None)
    return _WORKER_ENV[key]


def record_episode(cfg: RecordConfig, job: EpisodeJob) -> tuple[EpisodeJob, EpisodeBuffer, dict]:
    """Drive the (noisy) expert for one episode and keep every step in memory.

    Step t stores the frames and state the policy acted on, the executed command, the
    clean expert label for that state, and the throttle the cruise control applied.
    """
    env = _worker_env(cfg)
    expert = ExpertPolicy(cfg.expert, env.vehicle_params)
    if cfg.learner is not None:
        learner = _worker_learner(cfg.learner, cfg.learner_kwargs)
        policy = MixturePolicy(expert, learner, cfg.beta, cfg.mixture, seed=job.noise_seed)
    elif cfg.noise > 0:
        policy = NoisyExpert(expert, cfg.noise, cfg.noise_kind, seed=job.noise_seed, dt=env.dt)
    else:
        policy = expert
    obs, info = env.reset(seed=job.reset_seed, options={"track": job.track, "condition": job.condition})
    buffer = EpisodeBuffer(cfg.cameras)
    start = np.ones(1, bool)
    terminated = False
    steps = 0
    policy_state = None
    name = cfg.learner or cfg.expert  # a misbehaving policy can only be the learner (or the expert's law)
    where = [f"episode {job.index} (track {env.track.name})"]
    while not terminated and steps < MAX_EPISODE_STEPS:
        batch = {key: value[None] for key, value in obs.items()}  # the policy contract: a batch (of one)
        actions, policy_state = checked_predict(policy, batch, policy_state, start, name=name, where=where)
        action = np.clip(actions[0], -1.0, 1.0)  # the command executed (the environment clips it too)
        start = np.zeros(1, bool)
        # The first camera's frame is the observation's image; the side cameras' are in info.
        frames = {cfg.cameras[0]: obs["image"], **info.get("frames", {})}
        state = {key: info[key] for key in ("speed", "x", "y", "yaw", "lateral_offset", "heading_error", "progress",
                                            "curvature", "time", "wheel_angle")}
        label = info["expert_steering"]
        obs, _, terminated, _, info = env.step(action)
        buffer.append(frames, steering=float(action[0]), expert_steering=label, throttle=info["throttle"],
                      perturbation_phase=info.get("perturbation_phase", 0), **state)
        steps += 1
    attrs = {"episode": job.index, "track": env.track.name, "track_spec": env.track.to_spec(),
             "condition": job.condition, "seed": job.reset_seed, "noise_seed": job.noise_seed,
             "success": bool(info["success"]), "off_road": bool(info["off_road"])}
    return job, buffer, attrs


_WORKER_LEARNER: dict = {}


def _worker_learner(spec: str, kwargs: dict | None):
    """The DAgger learner of this process, loaded once (re-created from its spec in every worker)."""
    key = (spec, json.dumps(kwargs or {}, sort_keys=True))
    if key not in _WORKER_LEARNER:
        from steerloop.agents import load_policy

        _WORKER_LEARNER.clear()
        _WORKER_LEARNER[key] = load_policy(spec, kwargs)
    return _WORKER_LEARNER[key]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _check_condition_file_unchanged(cfg: RecordConfig) -> None:
    """Refuse to resume ``cfg.out`` when the condition file's content (hash) differs from the
    recording's, or one of them has a condition file and the other none, naming the file."""
    try:
        with open(os.path.join(cfg.out, MANIFEST), encoding="utf-8") as handle:
            recorded = json.load(handle).get("config", {}).get("condition_file")
    except (OSError, ValueError, AttributeError):
        return  # no (readable) manifest: nothing to resume, or the writer reports the damage
    check_condition_file_unchanged(recorded, cfg.condition_source, cfg.out)


def check_condition_file_unchanged(recorded, now: ConditionFile | None, out, made: str = "recorded",
                                   error: type[Exception] = LogError) -> None:
    """Refuse to resume ``out`` (``made`` with the condition file identity ``recorded``, as stored
    by :meth:`ConditionFile.identity`, or None) with the file ``now``: its content hash differs,
    or one of them has a condition file and the other none. Raises ``error`` naming the file."""
    if recorded is None and now is None:
        return
    old = recorded.get("sha256") if isinstance(recorded, dict) else None
    if now is None:
        raise error(f"{out} was {made} with a condition file (content sha256 {str(old)[:12]}); give "
                    "condition_file (--condition-file) with that content to resume it, or pick another --out")
    if old != now.sha256:
        made_with = f"content sha256 {old[:12]}" if old else "no condition file"
        raise error(f"condition file {now.path}: its content (sha256 {now.sha256[:12]}) is not what {out} "
                    f"was {made} with ({made_with}); restore that file to resume, or pick another --out "
                    "(nothing was changed)")


def record(cfg: RecordConfig, progress: bool = True) -> dict:
    """Record the missing episodes of ``cfg`` into ``cfg.out``; returns a summary."""
    from tqdm import tqdm

    if cfg.learner is not None:
        _worker_learner(cfg.learner, cfg.learner_kwargs)  # a bad learner spec fails before any file is made
    if cfg.backend == "ray":
        connect_ray(cfg.address, num_cpus=cfg.workers)  # an unreachable cluster fails before any file is made
    _check_condition_file_unchanged(cfg)
    created = not os.path.exists(cfg.out)
    extra = {"expert": {"law": cfg.expert}, **cfg.extra}
    if cfg.condition_file is not None:
        extra["condition_file"] = os.fspath(cfg.condition_file)  # where it was read (its content hash is in config)
    writer = DrivingLogWriter(cfg.out, config=cfg.dataset_config(), cameras=cfg.cameras, resolution=cfg.resolution,
                              suite=cfg.suite if cfg.track is None else None, seeds={"seed": cfg.seed}, extra=extra)
    damaged = writer.damaged()  # listed but missing or not matching the manifest: recorded again (deterministic)
    done = writer.completed()  # damaged() cached the intact files' checks (docs/driving-log.md, Integrity)
    jobs = [job for job in episode_jobs(cfg) if job.index not in done]
    bar = tqdm(total=cfg.episodes, initial=cfg.episodes - len(jobs), unit="ep", desc=f"record {cfg.out}",
               disable=not progress, dynamic_ncols=True)
    frames = 0
    started = time.perf_counter()

    def finish(result) -> None:
        nonlocal frames
        job, buffer, attrs = result
        writer.write_episode(job.index, buffer, attrs)
        frames += len(buffer)
        bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - started):.0f}")
        bar.update(1)

    try:
        run_tasks(record_episode, [(cfg, job) for job in jobs], finish, workers=cfg.workers, backend=cfg.backend,
                  address=cfg.address, initializer=_init_worker)
    except PolicyError:
        if created and not writer.completed():
            shutil.rmtree(cfg.out, ignore_errors=True)  # the learner failed at once: leave no empty dataset
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    return {"out": os.fspath(cfg.out), "episodes_recorded": len(jobs), "episodes_total": cfg.episodes,
            "episodes_rerecorded": {episode_file(index): problem for index, problem in damaged.items()},
            "frames": frames, "seconds": elapsed, "frames_per_s": frames / elapsed if elapsed > 0 else 0.0}
