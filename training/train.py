"""Behaviour cloning from driving logs (``steerloop train``), in one pass:
config -> seeding -> data -> model -> loop -> checkpoint.

Determinism and resumption: everything random in epoch ``e`` (window order, augmentation,
dropout) is drawn from generators seeded with ``(seed, e)``, and the full trainer state
(weights, AdamW moments, step, best score) is saved at the end of every epoch. A resumed
run therefore ends with exactly the weights of an uninterrupted one (same seed, same
thread count).
"""

from __future__ import annotations

import json
import math
import queue
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from steerloop.agents.checkpoint import load_checkpoint, save_checkpoint
from steerloop.agents.models import ARCHS, INPUTS, ModelConfig, build_model, count_parameters
from steerloop.agents.preprocess import PreprocessConfig
from steerloop.errors import SteerloopError
from steerloop.sim.camera import CameraSpec
from steerloop.training.copycat import keyframe_weights
from steerloop.training.encoder import TARGETS as ENCODER_TARGETS_MAP
from steerloop.training.encoder import EncoderConfig, load_encoder, pretrain_encoder
from steerloop.training.data import AUGMENTATIONS, BatchMaker, load_episodes, manifest_id, split_episodes, windows

STATE_DIR = "trainer_state"  # inside the output directory: resumable optimiser state
ENCODER_TARGETS = tuple(ENCODER_TARGETS_MAP)
FEEDBACK_MODES = ("teacher", "scheduled", "dropout", "keyframe")
ADDED_FIELDS = {"inputs": ["image"], "feedback_mode": "teacher", "sampling_final": 1.0, "input_dropout": 0.5,
                "keyframe_strength": 2.0, "encoder": None, "encoder_data": [], "encoder_target": "steering",
                "encoder_epochs": 4, "keep_epochs": []}  # TrainConfig fields newer than some resumable runs, at their defaults
DEFAULT_SEQ_LEN = {"pilotnet": 1, "komanda": 10, "chauffeur": 50}  # [steps]; other archs: 16


@dataclass
class TrainConfig:
    """Behaviour-cloning run. Every field is a ``steerloop train`` flag."""

    data: list[str] = field(default_factory=list)
    """Driving-log directories to train on (episodes of all of them are pooled)."""
    out: str = "runs/model"
    """Output directory: ``best/`` and ``last/`` checkpoints, ``trainer_state/``, ``tb/``."""
    model: str = "cnn-lstm"
    """Architecture: pilotnet, cnn-lstm, conv3d-lstm, komanda or chauffeur (see docs/models.md)."""
    inputs: tuple[str, ...] = ("image",)
    """Model inputs: image, prev_steering (the command executed at t-1; in closed loop the model's own previous
    output), speed (measured). komanda always feeds back its outputs."""
    feedback_mode: str = field(default="teacher", metadata={"cli": {"choices": FEEDBACK_MODES}})
    """How fed-back inputs are trained: teacher (logged values), scheduled (scheduled sampling: the model's own
    predictions with a probability annealed over training), dropout (past-input dropout, ChauffeurNet), keyframe
    (teacher forcing with keyframe-weighted loss, Wen et al. 2021)."""
    sampling_final: float = 1.0
    """scheduled: probability of feeding back the model's own prediction at the end of training (rises
    linearly from 0)."""
    input_dropout: float = 0.5
    """dropout: probability that a step's fed-back inputs are zeroed in training."""
    keyframe_strength: float = 2.0
    """keyframe: weight of a frame = 1 + strength x (error of the history-only predictor there / its mean),
    normalised to mean 1."""
    seq_len: int = 0
    """Window length T in steps; 0 picks 1 for pilotnet, 10 for komanda, 50 for chauffeur and 16 otherwise."""
    epochs: int = 4
    """Maximum number of epochs (early stopping may end sooner)."""
    keep_epochs: tuple[int, ...] = ()
    """Epochs (1..epochs) after which a full checkpoint OUT/epoch_NN/ is kept beside best/ and last/ (same format,
    loadable as a policy); an epoch that early stopping never reaches has none."""
    batch_frames: int = 128
    """Frames per optimiser step; the batch holds batch_frames // seq_len windows."""
    camera: str = "center"
    """center, or all (use the left/right cameras with corrective labels too)."""
    augment: tuple[str, ...] = ("shift", "jitter")
    """Augmentations: side (needs --camera all), shift (viewpoint shift + rotation), jitter (photometric)."""
    val_fraction: float = 0.2
    """Fraction of episodes held out for validation (split by episode, never by frame)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear learning-rate warmup steps, then cosine decay to lr/20."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    patience: int = 3
    """Stop after this many epochs without a better validation loss."""
    seed: int = 0
    """Seeds the split, the initial weights and every epoch's randomness."""
    threads: int = 2
    """torch intra-op threads (recorded: results are bit-identical only for the same count)."""
    hidden: int = 64
    """LSTM hidden size (recurrent models)."""
    crop_top: int = 20
    """Rows removed from the top of the camera frame (sky) before resizing."""
    input_size: tuple[int, int] = (66, 200)
    """Network input (h, w) after cropping and resizing."""
    init: str | None = None
    """Start from this checkpoint's weights (fine-tuning); its architecture must match."""
    encoder: str | None = None
    """chauffeur: the frozen frame encoder (an encoder directory or a cnn-lstm/chauffeur checkpoint); unset: pretrain
    one first into OUT/encoder on --encoder-data."""
    encoder_data: list[str] = field(default_factory=list)
    """chauffeur: datasets the frame encoder is pretrained on (usually larger than --data; default: --data)."""
    encoder_target: str = field(default="steering", metadata={"cli": {"choices": ENCODER_TARGETS}})
    """chauffeur: what the encoder is pretrained to predict from one frame: steering, or lane (lateral offset,
    heading error, curvature)."""
    encoder_epochs: int = 4
    """chauffeur: epochs of encoder pretraining."""

    def __post_init__(self):
        self.augment = tuple(a for a in self.augment if a)
        self.inputs = tuple(a for a in self.inputs if a) or ("image",)
        self.input_size = tuple(int(v) for v in self.input_size)
        if not self.data:
            raise ValueError("data: give at least one driving-log directory")
        if self.model not in ARCHS:
            raise ValueError(f"model must be one of {ARCHS}, got {self.model!r}")
        if self.seq_len == 0:
            self.seq_len = DEFAULT_SEQ_LEN.get(self.model, 16)
        self._check_feedback()
        if self.seq_len < 1 or self.batch_frames < self.seq_len:
            raise ValueError(f"need 1 <= seq_len ({self.seq_len}) <= batch_frames ({self.batch_frames})")
        if self.camera not in ("center", "all"):
            raise ValueError(f"camera must be center or all, got {self.camera!r}")
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"augment: unknown {unknown}; choose from {AUGMENTATIONS}")
        if "side" in self.augment and self.camera != "all":
            raise ValueError("augment side needs the side cameras: set camera to all")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if any(isinstance(e, bool) or not isinstance(e, int) for e in self.keep_epochs):
            raise ValueError(f"keep_epochs must be whole epoch numbers, got {list(self.keep_epochs)}")
        self.keep_epochs = tuple(sorted(set(self.keep_epochs)))
        outside = [e for e in self.keep_epochs if not 1 <= e <= self.epochs]
        if outside:
            raise ValueError(f"keep_epochs must be within 1..epochs (1..{self.epochs}), got {outside}")

    def _check_feedback(self) -> None:
        unknown = [a for a in self.inputs if a not in INPUTS]
        if unknown or "image" not in self.inputs:
            raise SteerloopError(f"inputs: {'unknown ' + str(unknown) if unknown else 'image is missing'}; give a "
                                 f"comma-separated list from {INPUTS} that includes image")
        if self.feedback_mode not in FEEDBACK_MODES:
            raise SteerloopError(f"feedback_mode must be one of {FEEDBACK_MODES}, got {self.feedback_mode!r}")
        fed_back = self.model == "komanda" or "prev_steering" in self.inputs
        if self.feedback_mode in ("scheduled", "dropout") and not fed_back:
            raise SteerloopError(f"feedback_mode {self.feedback_mode} trains fed-back inputs, and a {self.model} with "
                                 f"inputs {','.join(self.inputs)} has none: add prev_steering to inputs")
        if self.feedback_mode == "scheduled" and self.seq_len < 2:
            raise SteerloopError("feedback_mode scheduled feeds back predictions within a window: it needs "
                                 f"seq_len >= 2, got {self.seq_len}")
        for name, value in (("sampling_final", self.sampling_final), ("input_dropout", self.input_dropout)):
            if not 0.0 <= value <= 1.0:
                raise SteerloopError(f"{name} is a probability in [0, 1], got {value}")
        if not (math.isfinite(self.keyframe_strength) and self.keyframe_strength >= 0):
            raise SteerloopError(f"keyframe_strength must be a number >= 0, got {self.keyframe_strength}")
        if self.model != "chauffeur" and (self.encoder or self.encoder_data):
            raise SteerloopError(f"encoder and encoder_data are for model chauffeur, not {self.model}")
        if self.encoder_target not in ENCODER_TARGETS:
            raise SteerloopError(f"encoder_target must be one of {ENCODER_TARGETS}, got {self.encoder_target!r}")
        if self.encoder_epochs < 1:
            raise SteerloopError(f"encoder_epochs must be >= 1, got {self.encoder_epochs}")

    @property
    def cameras(self) -> tuple[str, ...]:
        return ("center", "left", "right") if self.camera == "all" else ("center",)

    def model_config(self) -> ModelConfig:
        return ModelConfig(arch=self.model, hidden=self.hidden, inputs=self.inputs,
                           preprocess=PreprocessConfig(crop_top=self.crop_top, resize=self.input_size))

    def feedback_schedule(self, step: int, total_steps: int) -> dict[str, float]:
        """The forward keywords of training step ``step``: the probability of feeding back the
        model's own prediction (scheduled sampling, linear from 0 to sampling_final) and of
        dropping the fed-back inputs (past-input dropout)."""
        if self.feedback_mode == "scheduled":
            return {"own_probability": self.sampling_final * min(step / max(total_steps - 1, 1), 1.0)}
        if self.feedback_mode == "dropout":
            return {"drop_probability": self.input_dropout}
        return {}


def epoch_dir(out: str | Path, epoch: int) -> Path:
    """The checkpoint kept after ``epoch`` (1-based) with keep_epochs: ``OUT/epoch_NN``."""
    return Path(out) / f"epoch_{epoch:02d}"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to lr/20."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_windows(model, make_batch, val_windows: np.ndarray, batch_windows: int) -> dict:
    """Validation loss and steering RMSE on un-augmented windows, beside the all-zeros RMSE."""
    model.eval()
    sq_err, sq_zero, sq_free, n, loss_sum, batches = 0.0, 0.0, 0.0, 0, 0.0, 0
    for i in range(0, len(val_windows), batch_windows):
        batch = make_batch(val_windows[i:i + batch_windows])
        loss, metrics = model(batch)  # no mask: steering_mse is the mean over every frame of the batch
        sq_err += metrics["steering_mse"] * batch["steering"].numel()
        sq_zero += float((batch["steering"] ** 2).sum())
        if model.feedback:  # the same windows with the model's own outputs fed back after step 0
            out, _ = model.outputs(batch["images"], None, speed=batch["speed"], teacher=model.teacher_inputs(batch),
                                   own_probability=1.0)
            sq_free += float(((out["steering"] - batch["steering"]) ** 2).sum())
        n += batch["steering"].numel()
        loss_sum += float(loss)
        batches += 1
    model.train()
    scores = {"val_loss": loss_sum / max(batches, 1), "val_rmse": math.sqrt(sq_err / max(n, 1)),
              "zeros_rmse": math.sqrt(sq_zero / max(n, 1))}
    if model.feedback:
        scores["val_rmse_free_running"] = math.sqrt(sq_free / max(n, 1))
    return scores


def prefetch(batches, depth: int = 2):
    """Yield from the generator ``batches`` while a background thread builds the next ones.

    OpenCV and torch release the GIL, so cutting, augmenting and preprocessing the next
    batch overlaps with the current optimiser step. One producer consumes the generator in
    order, so batches (and the random draws inside them) are exactly those of a serial loop.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in batches:
                if stop.is_set():
                    return
                items.put(item)
            items.put(done)
        except BaseException as error:  # handed to the consumer, raised there
            items.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _save_state(out: Path, model, optimizer, progress: dict) -> None:
    """Weights + AdamW moments as safetensors, counters as JSON (never pickle)."""
    tmp = out / f"{STATE_DIR}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optim.{i}.{key}"] = value.contiguous() if torch.is_tensor(value) else torch.tensor(value)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "progress.json").write_text(json.dumps(progress, indent=1, sort_keys=True))
    final = out / STATE_DIR
    if final.exists():
        old = out / f"{STATE_DIR}.old"
        final.rename(old)
        tmp.rename(final)
        for child in old.iterdir():
            child.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


def _load_state(out: Path, model, optimizer) -> dict:
    tensors = load_file(str(out / STATE_DIR / "state.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        keys = [k for k in tensors if k.startswith(f"optim.{i}.")]
        if keys:
            optimizer.state[param] = {k.split(".", 2)[2]: tensors[k] for k in keys}
    return json.loads((out / STATE_DIR / "progress.json").read_text())


def _frozen_encoder(cfg: TrainConfig, model, out: Path) -> dict:
    """Load chauffeur's frame encoder: ``--encoder``, or the one pretrained in OUT/encoder
    (pretrained there first, on --encoder-data, if it is not there yet). The model keeps it frozen."""
    path = cfg.encoder
    if path is None:
        path = out / "encoder"
        if not (path / "encoder.json").is_file():
            data = cfg.encoder_data or cfg.data
            pretrain_encoder(EncoderConfig(data=list(data), out=str(path), target=cfg.encoder_target,
                                           epochs=cfg.encoder_epochs, seed=cfg.seed), model.config, manifest_id(data))
    return load_encoder(path, model)


def train(cfg: TrainConfig, progress_bar: bool = True) -> dict:
    """Train one model; returns the best checkpoint's validation metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    run_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    config_file = out / "train_config.json"
    if config_file.exists():
        previous = json.loads(config_file.read_text())
        added = {k: v for k, v in run_config.items() if k in ADDED_FIELDS and v == ADDED_FIELDS[k]}
        if {**added, **previous} != run_config:  # runs begun before a field existed had its default
            raise ValueError(f"{out} holds a run with a different configuration ({config_file}); "
                             "use another out, or delete it to start over")

    # Data: episodes in memory, split by episode.
    episodes, reference = load_episodes(cfg.data, cfg.cameras)
    train_eps, val_eps = split_episodes(len(episodes), cfg.val_fraction, cfg.seed)
    T = cfg.seq_len
    train_windows = windows(episodes, train_eps, T, stride=max(T // 2, 1))
    val_windows = windows(episodes, val_eps, T, stride=T)
    if len(train_windows) == 0 or len(val_windows) == 0:
        raise ValueError(f"episodes are shorter than seq_len {T}; record longer episodes or lower it")
    sim_config = reference["config"]
    height, width = reference["resolution"]
    camera_spec = CameraSpec(height=height, width=width, fov_deg=sim_config.get("fov_deg", 45.0),
                             pitch_deg=sim_config.get("camera_pitch_deg", 8.0),
                             mount_height=sim_config.get("camera_height", 1.4))
    model_config = cfg.model_config()
    weights = None
    if cfg.feedback_mode == "keyframe":  # the history-only predictor is fitted on the training episodes only
        weights = keyframe_weights([ep.executed for ep in episodes], [ep.steering for ep in episodes],
                                   cfg.keyframe_strength, fit_on=train_eps)
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(run_config, indent=1, sort_keys=True))  # the data checked out: claim --out
    make_batch = BatchMaker(episodes, T, model_config.preprocess, camera_spec, cfg.cameras, cfg.augment, weights)

    # Model and optimiser.
    torch.manual_seed(cfg.seed)
    model = build_model(model_config)
    encoder_meta = _frozen_encoder(cfg, model, out) if cfg.model == "chauffeur" else None
    if cfg.init is not None:
        init_model, init_config, _ = load_checkpoint(cfg.init)
        if init_config.to_dict() != model_config.to_dict():
            raise ValueError(f"init {cfg.init} is a {init_config.arch} with a different configuration than "
                             f"the {cfg.model} being trained; fine-tune only from the same architecture and inputs")
        model.load_state_dict(init_model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_windows = max(cfg.batch_frames // T, 1)
    steps_per_epoch = math.ceil(len(train_windows) / batch_windows)
    total_steps = steps_per_epoch * cfg.epochs
    progress = {"epoch": 0, "step": 0, "best_val_loss": float("inf"), "best_epoch": -1, "history": []}
    if (out / STATE_DIR / "progress.json").exists():
        progress = _load_state(out, model, optimizer)
    data_id = manifest_id(cfg.data)
    meta = {"training": run_config, "data_manifest_id": data_id, "git_revision": git_revision(),
            "seed": cfg.seed, "threads": cfg.threads, "train_episodes": len(train_eps), "val_episodes": len(val_eps)}
    if encoder_meta is not None:
        meta["encoder"] = encoder_meta

    writer = SummaryWriter(str(out / "tb"))
    model.train()
    epochs_without_improvement = progress["epoch"] - 1 - progress["best_epoch"] if progress["best_epoch"] >= 0 else 0
    started = time.perf_counter()
    try:
        for epoch in range(progress["epoch"], cfg.epochs):
            if epochs_without_improvement >= cfg.patience:
                break
            rng = np.random.default_rng([cfg.seed, epoch])
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            order = train_windows[rng.permutation(len(train_windows))]
            batches = prefetch(make_batch(order[i * batch_windows:(i + 1) * batch_windows], rng)
                               for i in range(steps_per_epoch))
            bar = tqdm(batches, total=steps_per_epoch, desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", disable=not progress_bar, dynamic_ncols=True)
            for batch in bar:
                lr = lr_at(progress["step"], total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, metrics = model(batch, **cfg.feedback_schedule(progress["step"], total_steps))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                optimizer.step()
                progress["step"] += 1
                if progress["step"] % 10 == 0:
                    writer.add_scalar("train/loss", metrics["loss"], progress["step"])
                    writer.add_scalar("train/lr", lr, progress["step"])
                    writer.add_scalar("train/grad_norm", grad_norm, progress["step"])
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.1e}")
            bar.close()
            scores = evaluate_windows(model, make_batch, val_windows, batch_windows)
            for key, value in scores.items():
                writer.add_scalar(f"val/{key}", value, epoch + 1)
            improved = scores["val_loss"] < progress["best_val_loss"]
            progress["history"].append({"epoch": epoch + 1, **scores})
            progress["epoch"] = epoch + 1
            checkpoint_meta = {**meta, "epoch": epoch + 1, "metrics": scores}
            save_checkpoint(out / "last", model, model_config, checkpoint_meta)
            if epoch + 1 in cfg.keep_epochs:
                save_checkpoint(epoch_dir(out, epoch + 1), model, model_config, checkpoint_meta)
            if improved:
                progress["best_val_loss"] = scores["val_loss"]
                progress["best_epoch"] = epoch
                save_checkpoint(out / "best", model, model_config, checkpoint_meta)
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
            _save_state(out, model, optimizer, progress)
            if progress_bar:
                print(f"epoch {epoch + 1}: val_loss {scores['val_loss']:.5f}  val_rmse {scores['val_rmse']:.4f}  "
                      f"(all-zeros {scores['zeros_rmse']:.4f})" + ("  *best" if improved else ""))
    finally:
        writer.close()
    _, _, best_meta = load_checkpoint(out / "best")
    return {"out": str(out), "params": count_parameters(model), "seconds": time.perf_counter() - started,
            "epochs_run": progress["epoch"], **best_meta["metrics"]}
