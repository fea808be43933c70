"""Checkpoints: a directory with ``model.safetensors`` (weights only) and ``config.json``.

``config.json`` holds {"format": "steerloop-checkpoint", "format_version": 1,
"model": ModelConfig.to_dict(), ...caller fields (training config, data manifest id, git
revision, seeds, thread count, metrics)}. Loading never unpickles anything: files such as
``.pt``/``.pth``/``.pkl``/``.ckpt`` are refused, and weights are read with safetensors.
Saving writes a temporary sibling directory and renames it into place, so a crash never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steerloop.errors import SteerloopError
from steerloop.agents.models import ADDED_FIELDS, ModelConfig, SteeringModel, build_model
from steerloop.agents.policy import LearnedPolicy

FORMAT = "steerloop-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RESERVED_KEYS = ("format", "format_version", "model")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib")
LAYOUT = (f"steerloop checkpoints are directories with {WEIGHTS_FILE} and {CONFIG_FILE}; "
          "pickle files are never loaded")
MAX_LISTED = 5  # tensor names quoted in a mismatch message


class CheckpointError(SteerloopError):
    """A path is not a loadable steerloop checkpoint (the message says why and how to fix it)."""


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: str | os.PathLike, model: SteeringModel, config: ModelConfig,
                    extra: dict | None = None) -> Path:
    """Write ``model`` + ``config`` (+ JSON-serialisable ``extra`` fields) to the directory
    ``path``; an existing checkpoint there is replaced. Returns the checkpoint path."""
    path = Path(path)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra may not set {clash}: those config.json keys are written by save_checkpoint")
    if model.config.to_dict() != config.to_dict():
        raise ValueError("save_checkpoint: config differs from the ModelConfig the model was built with; "
                         "pass model.config")
    if path.exists() and not (path.is_dir() and ((path / CONFIG_FILE).is_file() or not any(path.iterdir()))):
        raise FileExistsError(f"{path} exists and is not a steerloop checkpoint directory; refusing to overwrite "
                              f"it: choose another path or remove it")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict(), **extra}
    try:
        config_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"extra must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None

    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / WEIGHTS_FILE, "rb") as f:
            os.fsync(f.fileno())
        _fsync_write(tmp / CONFIG_FILE, (config_text + "\n").encode())
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def _read_meta(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; {LAYOUT}")
    if not path.is_dir():
        fix = (f"pass its directory {path.parent}" if path.name in (CONFIG_FILE, WEIGHTS_FILE)
               else "re-export the weights with agents.checkpoint.save_checkpoint")
        raise CheckpointError(f"{path} is a file, not a checkpoint directory: {LAYOUT}; {fix}")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickles)}: not loaded)" if pickles else ""
        raise CheckpointError(f"{path} is missing {' and '.join(missing)}{hint}; {LAYOUT}")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON ({e}); re-save the checkpoint "
                              f"with save_checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path / CONFIG_FILE} is not a steerloop checkpoint config "
                              f"(format={found!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_FILE} has format_version {meta.get('format_version')!r}; this "
                              f"steerloop reads version {FORMAT_VERSION}: re-save the checkpoint with this version")
    if "model" not in meta:
        raise CheckpointError(f"{path / CONFIG_FILE} has no 'model' entry (the ModelConfig); re-save the checkpoint")
    return meta


def _first(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[SteeringModel, ModelConfig, dict]:
    """(model in eval mode, ModelConfig, the other config.json fields) from a checkpoint directory."""
    path = Path(path)
    meta = _read_meta(path)
    model_meta = meta["model"]
    if isinstance(model_meta, dict):  # fields added later: absent from older checkpoints, which they reproduce
        model_meta = {**{k: list(v) if isinstance(v, tuple) else v for k, v in ADDED_FIELDS.items()}, **model_meta}
    missing = sorted({f.name for f in fields(ModelConfig)} - set(model_meta)) if isinstance(model_meta, dict) else []
    if missing:
        raise CheckpointError(f"{path / CONFIG_FILE}: the model config lacks {missing}; save_checkpoint writes every "
                              f"field, so the file was edited or truncated: restore it or re-save the checkpoint")
    try:
        config = ModelConfig.from_dict(model_meta)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config: {e}") from None
    model = build_model(config)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE} is not a readable safetensors file ({e}); {LAYOUT}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = []
    if missing := set(expected) - set(got):
        problems.append(f"missing tensors: {_first(missing)}")
    if unexpected := set(got) - set(expected):
        problems.append(f"unexpected tensors: {_first(unexpected)}")
    shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if shapes:
        listed = "; ".join(f"{k}: file {got[k]} vs config {expected[k]}" for k in shapes[:MAX_LISTED])
        more = f" (+{len(shapes) - MAX_LISTED} more)" if len(shapes) > MAX_LISTED else ""
        problems.append(f"shape mismatches: {listed}{more}")
    if problems:
        raise CheckpointError(f"the weights in {path / WEIGHTS_FILE} do not match the model described by "
                              f"{path / CONFIG_FILE} (arch={config.arch!r}): {'; '.join(problems)}. The config "
                              f"was edited or the files come from different models; re-save with save_checkpoint")
    non_finite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: tensor(s) {_first(non_finite)} hold NaN or inf values (training "
                              f"diverged, or the file is damaged): use an earlier checkpoint or retrain")
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return model, config, {k: v for k, v in meta.items() if k != "model"}


def load_policy_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LearnedPolicy:
    """A :class:`LearnedPolicy` driving with the checkpoint's model and preprocessing."""
    model, config, _ = load_checkpoint(path, device)
    policy = LearnedPolicy(model, config, device)
    policy.checkpoint = str(path)
    return policy
