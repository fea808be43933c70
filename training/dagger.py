"""DAgger (Ross, Gordon and Bagnell 2011): let the learner drive, ask the expert, retrain.

Each iteration i records ``episodes_per_iter`` episodes on training-suite tracks with the
mixture policy (expert with probability beta_i, else the current learner), logging the
expert's label at every visited state in the normal driving-log format; then trains on
the initial data plus every iteration's data (from scratch or fine-tuned), and scores the
new checkpoint with ``evaluate_fn`` (closed loop on validation tracks, supplied by the
command line so this package does not depend on ``evaluation``). Finished iterations are
recorded in ``OUT/dagger.json``; an interrupted run resumes at the first unfinished one
(recording and training resume themselves inside an iteration).

The episodes cycle through ``conditions`` across the whole run: episode k of iteration i
drives under ``conditions[(i * episodes_per_iter + k) % len(conditions)]`` whatever the number
of workers (each iteration's recording gets the list rotated to where the last one stopped and
assigns it as ``steerloop record`` does), so every condition is driven even when an iteration
has fewer episodes than there are conditions; a user's ``condition_file`` counts by its content hash.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from steerloop.files import atomic_write_json
from steerloop.agents.checkpoint import load_checkpoint
from steerloop.agents.mixture import MIXTURE_MODES
from steerloop.driving_log import DrivingLog
from steerloop.parallel import check_backend
from steerloop.sim.conditions import ConditionFile, check_conditions, read_condition_file
from steerloop.training.record import RecordConfig, check_condition_file_unchanged, record
from steerloop.training.train import TrainConfig, train

RETRAIN_MODES = ("scratch", "finetune")
DEFAULT_CONDITIONS = ("default",)


@dataclass
class DaggerConfig:
    """A DAgger run. Every field is a ``steerloop dagger`` flag."""

    init: str = ""
    """Behaviour-cloning checkpoint the first iteration's learner starts from."""
    data: list[str] = field(default_factory=list)
    """The expert datasets that checkpoint was trained on (kept in every aggregate)."""
    out: str = "runs/dagger"
    """Run directory: iter_XX/data, iter_XX/model, dagger.json."""
    iterations: int = 4
    """Number of DAgger iterations."""
    episodes_per_iter: int = 10
    """Episodes recorded per iteration."""
    beta_schedule: tuple[float, ...] = (0.5, 0.25, 0.0)
    """beta per iteration (probability that the expert drives); the last value repeats."""
    mixture: str = "step"
    """Flip the expert/learner coin every step or once per episode."""
    retrain: str = "scratch"
    """Retrain each iteration from scratch (seeded) or fine-tune the previous learner."""
    epochs: int = 4
    """Training epochs per iteration."""
    workers: int = 1
    """Recording worker processes (episodes recorded at once)."""
    backend: str = "local"
    """Where recording runs: local or ray (same data; not part of the run's identity)."""
    address: str | None = None
    """With backend ray: the cluster ("auto" or "HOST:PORT"); None starts a local Ray instance."""
    seed: int = 0
    """Seeds recording (per iteration) and training."""
    track_length: float = 400.0
    """Length of the procedural training routes [m]."""
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    """Visual conditions, assigned to each iteration's episodes in turn (as record assigns them)."""
    condition_file: str | None = None
    """A JSON or TOML file of your own scenery/weather/camera values and named conditions (docs/world.md) that
    ``conditions`` may name; its content hash and the values used are part of the run's identity."""

    def __post_init__(self):
        self.beta_schedule = tuple(float(b) for b in self.beta_schedule)
        self.conditions = tuple(self.conditions)
        if not self.init:
            raise ValueError("init: give the behaviour-cloning checkpoint to start from")
        if not self.data:
            raise ValueError("data: give the expert dataset(s) the initial checkpoint was trained on")
        if self.iterations < 1 or self.episodes_per_iter < 1:
            raise ValueError(f"iterations ({self.iterations}) and episodes_per_iter "
                             f"({self.episodes_per_iter}) must be >= 1")
        if not self.beta_schedule or any(not 0.0 <= b <= 1.0 for b in self.beta_schedule):
            raise ValueError(f"beta_schedule must be values within [0, 1], got {self.beta_schedule}")
        if self.mixture not in MIXTURE_MODES:
            raise ValueError(f"mixture must be one of {MIXTURE_MODES}, got {self.mixture!r}")
        if self.retrain not in RETRAIN_MODES:
            raise ValueError(f"retrain must be one of {RETRAIN_MODES}, got {self.retrain!r}")
        check_conditions(self.conditions, self.condition_source)
        check_backend(self.backend, self.address)

    @functools.cached_property
    def condition_source(self) -> ConditionFile | None:
        """``condition_file`` read once, in this process (each iteration's recording checks it
        still has this content; its workers get the content, never the path)."""
        return read_condition_file(self.condition_file) if self.condition_file is not None else None

    def run_config(self) -> dict:
        """The fields that define the run (stored in dagger.json, compared on resume). Where it
        runs is left out; so are ``conditions`` and ``condition_file`` while they keep their
        defaults, so runs begun before they existed keep their identity. A condition file
        counts by its content hash and the values the conditions take from it, not its path."""
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                  if k not in ("backend", "address", "conditions", "condition_file")}
        if self.conditions != DEFAULT_CONDITIONS or self.condition_source is not None:
            config["conditions"] = list(self.conditions)
        if self.condition_source is not None:
            config["condition_file"] = self.condition_source.identity(self.conditions)
        return config

    def beta(self, iteration: int) -> float:
        return self.beta_schedule[min(iteration, len(self.beta_schedule) - 1)]


def _verified_resolution(datasets: list[str]) -> tuple[int, int]:
    """Check every episode of ``datasets`` against its manifest checksum (CorruptEpisodeError
    naming the file, before any iteration records or trains) and return the first one's
    camera resolution. The checks are cached, so each iteration's training does not redo them."""
    logs = [DrivingLog(path, verify=True) for path in datasets]
    for log in logs:
        log.close()
    return tuple(logs[0].resolution)


def _feedback_training(training: dict) -> dict:
    """How the initial policy trained its fed-back inputs (every iteration trains them alike)."""
    keys = ("feedback_mode", "sampling_final", "input_dropout", "keyframe_strength")
    return {key: training[key] for key in keys if key in training}


def _check_resumable(cfg: DaggerConfig, recorded: dict, table_path: Path) -> None:
    """Refuse to resume the run of ``table_path`` (whose stored config is ``recorded``) with
    other conditions, other condition-file content, or any other change of its configuration."""
    conditions = recorded.get("conditions", list(DEFAULT_CONDITIONS))
    if conditions != list(cfg.conditions):
        raise ValueError(f"conditions: {cfg.out} holds a DAgger run under conditions {conditions}, not "
                         f"{list(cfg.conditions)}; give those to resume it, or use another directory for out")
    check_condition_file_unchanged(recorded.get("condition_file"), cfg.condition_source, cfg.out, made="run",
                                   error=ValueError)
    if recorded != cfg.run_config():
        raise ValueError(f"{cfg.out} holds a DAgger run with a different configuration ({table_path}); "
                         "use another directory for out")


def _iteration_recording(cfg: DaggerConfig, i: int, learner: str, resolution: tuple[int, int]) -> RecordConfig:
    """What iteration ``i`` records: ``episodes_per_iter`` mixture episodes on training tracks,
    continuing the run's cycle through ``cfg.conditions`` where iteration ``i - 1`` stopped (a
    condition file must still hold the run's content)."""
    start = i * cfg.episodes_per_iter % len(cfg.conditions)
    conditions = (*cfg.conditions[start:], *cfg.conditions[:start])
    recording = RecordConfig(out=str(Path(cfg.out) / f"iter_{i:02d}" / "data"), episodes=cfg.episodes_per_iter,
                             suite="train", seed=cfg.seed * 1000 + i + 1, track_length=cfg.track_length,
                             resolution=resolution, conditions=conditions, condition_file=cfg.condition_file,
                             workers=cfg.workers, backend=cfg.backend, address=cfg.address,
                             learner=learner, beta=cfg.beta(i), mixture=cfg.mixture,
                             extra={"dagger_iteration": i, "learner": learner})
    source = cfg.condition_source
    if source is not None and recording.condition_source.sha256 != source.sha256:
        raise ValueError(f"condition file {source.path}: its content changed during the DAgger run (sha256 "
                         f"{source.sha256[:12]} when it started, {recording.condition_source.sha256[:12]} now); "
                         "restore it and re-run the same command to resume")
    return recording


def run_dagger(cfg: DaggerConfig, evaluate_fn: Callable[[str, int], dict] | None = None,
               progress: bool = True) -> list[dict]:
    """Run (or resume) DAgger; returns one row per iteration (also saved in dagger.json)."""
    out = Path(cfg.out)
    table_path = out / "dagger.json"
    state = {"config": cfg.run_config(), "iterations": []}
    if table_path.exists():
        state = json.loads(table_path.read_text())
        _check_resumable(cfg, state["config"], table_path)
    datasets = list(cfg.data) + [row["data"] for row in state["iterations"]]
    resolution = _verified_resolution(datasets)
    _, init_config, init_meta = load_checkpoint(cfg.init)
    training = init_meta.get("training", {})
    learner = cfg.init if not state["iterations"] else state["iterations"][-1]["checkpoint"]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(state["iterations"]), cfg.iterations):
        recording = _iteration_recording(cfg, i, learner, resolution)
        recorded = record(recording, progress=progress)
        data_dir = recording.out
        datasets.append(data_dir)
        model_dir = out / f"iter_{i:02d}" / "model"
        train(TrainConfig(data=list(datasets), out=str(model_dir), model=init_config.arch,
                          seq_len=training.get("seq_len", 0), epochs=cfg.epochs, seed=cfg.seed,
                          crop_top=init_config.preprocess.crop_top, input_size=tuple(init_config.preprocess.resize),
                          hidden=init_config.hidden, augment=tuple(training.get("augment", ("shift", "jitter"))),
                          inputs=tuple(init_config.inputs), **_feedback_training(training),
                          encoder=learner if init_config.arch == "chauffeur" else None,
                          init=learner if cfg.retrain == "finetune" else None), progress_bar=progress)
        learner = str(model_dir / "best")
        row = {"iteration": i, "beta": cfg.beta(i), "data": data_dir, "frames": recorded["frames"],
               "aggregate_datasets": len(datasets), "checkpoint": learner,
               "closed_loop": evaluate_fn(learner, i) if evaluate_fn else {}}
        state["iterations"].append(row)
        atomic_write_json(table_path, state)
    return state["iterations"]
