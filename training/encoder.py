"""The frozen frame encoder of ``chauffeur`` models: pretrained on single frames, then frozen.

Chauffeur (3rd place in the Udacity challenge) fed the features of a large pretrained CNN
into an LSTM. Here the encoder (agents.models.FrameEncoder, the per-frame trunk of the
recurrent models) is first trained alone on single frames of a steerloop dataset,
usually a larger one than the LSTM's, to predict either

- ``steering``: the expert's steering label, or
- ``lane``: the privileged lane features logged with every frame (lateral offset [m],
  heading error [rad], curvature [1/m]), each standardised over the dataset;

and its weights are then copied into the chauffeur model and frozen.

An encoder directory holds ``encoder.safetensors`` (the ``encoder.*`` tensors only, read
with safetensors, never unpickled) and ``encoder.json`` (format, target, feature size,
preprocessing, data manifest id, seed, final training loss). :func:`load_encoder` also
takes a steerloop checkpoint whose model has the same encoder (a cnn-lstm or a chauffeur).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from steerloop.agents.models import ENCODER_CONVS, FrameEncoder, ModelConfig
from steerloop.agents.preprocess import preprocess
from steerloop.errors import SteerloopError
from steerloop.driving_log import DrivingLog

ENCODER_FORMAT = "steerloop-encoder"
ENCODER_FILE, ENCODER_META = "encoder.safetensors", "encoder.json"
TARGETS = {"steering": ("expert_steering",), "lane": ("lateral_offset", "heading_error", "curvature")}
BATCH_FRAMES = 64  # frames per optimiser step
LEARNING_RATE = 1e-3
MAX_FRAMES = 20_000  # frames kept in memory for pretraining (a seeded subsample beyond)


class EncoderError(SteerloopError):
    """An encoder path cannot be used (missing, not an encoder, or a different shape)."""


@dataclass
class EncoderConfig:
    """Pretraining of a chauffeur frame encoder."""

    data: list[str] = field(default_factory=list)
    """Driving-log directories of single frames to pretrain on."""
    out: str = "runs/encoder"
    """Output directory: encoder.safetensors and encoder.json."""
    target: str = "steering"
    """steering (the expert's label) or lane (lateral offset, heading error, curvature)."""
    epochs: int = 4
    """Passes over the frames."""
    seed: int = 0
    """Seeds the subsample, the order and the initial weights."""

    def __post_init__(self):
        if self.target not in TARGETS:
            raise SteerloopError(f"encoder target must be one of {tuple(TARGETS)}, got {self.target!r}")
        if not self.data:
            raise SteerloopError("encoder pretraining needs at least one dataset")
        if self.epochs < 1:
            raise SteerloopError(f"encoder epochs must be >= 1, got {self.epochs}")


class _Pretrainer(nn.Module):
    """FrameEncoder + a linear head on the targets (the head is thrown away)."""

    def __init__(self, model_config: ModelConfig, targets: int):
        super().__init__()
        self.encoder = FrameEncoder(3, model_config.preprocess.resize, ENCODER_CONVS, model_config.feature_dim,
                                    model_config.dropout)
        self.head = nn.Linear(model_config.feature_dim, targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _frames_and_targets(cfg: EncoderConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 centre frames (N, H, W, 3) and standardised targets (N, k) of every dataset."""
    frames, targets = [], []
    for path in cfg.data:
        log = DrivingLog(path, verify=True)
        try:
            for index in log.episodes:
                data = log.read_episode(index, cameras=["center"])
                frames.append(data["frames/center"])
                targets.append(np.stack([data[name] for name in TARGETS[cfg.target]], axis=1))
        finally:
            log.close()
    if not frames:
        raise SteerloopError(f"no episodes in {cfg.data} to pretrain the encoder on; record some first")
    frames, targets = np.concatenate(frames), np.concatenate(targets).astype(np.float64)
    if len(frames) > MAX_FRAMES:
        keep = np.sort(rng.choice(len(frames), MAX_FRAMES, replace=False))
        frames, targets = frames[keep], targets[keep]
    std = targets.std(axis=0)
    targets = (targets - targets.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return frames, targets.astype(np.float32)


def pretrain_encoder(cfg: EncoderConfig, model_config: ModelConfig, data_id: str | None = None) -> Path:
    """Train a frame encoder for ``model_config`` (its preprocessing, feature size, dropout)
    on ``cfg.target``; write it to ``cfg.out`` (atomically) and return that path."""
    rng = np.random.default_rng(cfg.seed)
    frames, targets = _frames_and_targets(cfg, rng)
    torch.manual_seed(cfg.seed)
    model = _Pretrainer(model_config, targets.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    model.train()
    loss_value = math.nan
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(frames))
        total, count = 0.0, 0
        for start in range(0, len(order), BATCH_FRAMES):
            batch = order[start:start + BATCH_FRAMES]
            x = torch.from_numpy(preprocess(frames[batch], model_config.preprocess))
            loss = nn.functional.mse_loss(model(x), torch.from_numpy(targets[batch]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        loss_value = total / count
    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"encoder.{k}": v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
    save_file(tensors, str(tmp / ENCODER_FILE))
    meta = {"format": ENCODER_FORMAT, "target": cfg.target, "targets": list(TARGETS[cfg.target]),
            "feature_dim": model_config.feature_dim, "preprocess": model_config.preprocess.to_dict(),
            "data": list(cfg.data), "data_manifest_id": data_id, "frames": int(len(frames)), "epochs": cfg.epochs,
            "seed": cfg.seed, "final_loss": loss_value}
    (tmp / ENCODER_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_encoder(path: str | os.PathLike, model: nn.Module) -> dict:
    """Copy the frame encoder at ``path`` (an encoder directory, or a checkpoint with the same
    encoder) into ``model.encoder``; returns what is known about it. Shapes must match."""
    path = Path(path)
    if (path / ENCODER_META).is_file() and (path / ENCODER_FILE).is_file():
        weights, meta = path / ENCODER_FILE, json.loads((path / ENCODER_META).read_text())
        if meta.get("format") != ENCODER_FORMAT:
            raise EncoderError(f"{path / ENCODER_META} is not a steerloop encoder (format {meta.get('format')!r})")
    elif (path / "model.safetensors").is_file():
        weights, meta = path / "model.safetensors", {"checkpoint": str(path)}
    else:
        raise EncoderError(f"--encoder {path}: neither an encoder directory ({ENCODER_FILE} + {ENCODER_META}) nor a "
                           f"steerloop checkpoint; pretrain one (leave --encoder unset) or give a chauffeur checkpoint")
    if "preprocess" in meta and meta["preprocess"] != model.config.preprocess.to_dict():
        raise EncoderError(f"--encoder {path} was pretrained on frames prepared as {meta['preprocess']}, this model "
                           f"prepares them as {model.config.preprocess.to_dict()}: use the same --crop-top and "
                           f"--input-size")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise EncoderError(f"{weights} is not a readable safetensors file ({error})") from None
    wanted = {f"encoder.{k}": v.shape for k, v in model.encoder.state_dict().items()}
    found = {k: v for k, v in tensors.items() if k in wanted}
    bad = sorted(k for k in wanted if k not in found or tuple(found[k].shape) != tuple(wanted[k]))
    if bad:
        raise EncoderError(f"--encoder {path}: its frame encoder does not fit this model ({bad[0]}: "
                           f"{tuple(found[bad[0]].shape) if bad[0] in found else 'missing'} vs {tuple(wanted[bad[0]])});"
                           f" use the same --input-size and feature size")
    model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in found.items()})
    return {"path": str(path), **{k: meta[k] for k in ("target", "data_manifest_id", "frames", "final_loss",
                                                         "checkpoint") if k in meta}}
