"""Sequence windows over driving logs, split by episode, with recovery augmentation.

Episodes are decoded once into memory as uint8 frames (a 20-episode default dataset at
66x200 is about 0.7 GB per camera); batches are cut, augmented and preprocessed on the
fly with OpenCV, so training and driving see exactly the same preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steerloop.agents.preprocess import PreprocessConfig, preprocess
from steerloop.sim.camera import CameraSpec
from steerloop.driving_log import DrivingLog
from steerloop.training.augment import (CAMERA_SHIFTS, SHIFT_RANGE, YAW_RANGE, corrective_label, photometric_jitter,
                              warp_viewpoint)

AUGMENTATIONS = ("side", "shift", "jitter")
SHIFT_PROBABILITY = 0.5  # fraction of windows given a synthetic viewpoint shift when "shift" is on


@dataclass
class Episode:
    """One logged episode in memory: frames per camera (N, H, W, 3) uint8 and (N,) series:
    ``steering`` is the expert's label, ``executed`` the command actually executed (they
    differ under DART noise or DAgger; None means equal to the label)."""

    source: str
    index: int
    frames: dict[str, np.ndarray]
    steering: np.ndarray
    speed: np.ndarray
    throttle: np.ndarray
    executed: np.ndarray | None = None

    def __post_init__(self):
        if self.executed is None:
            self.executed = self.steering

    def __len__(self) -> int:
        return len(self.steering)


def manifest_id(paths: list[str]) -> str:
    """A short content id of the datasets (sha256 over their manifests' episode checksums)."""
    digest = hashlib.sha256()
    for path in paths:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        digest.update(json.dumps(manifest.get("episodes", {}), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_episodes(paths: list[str], cameras: tuple[str, ...]) -> tuple[list[Episode], dict]:
    """Decode every episode of every dataset; returns the episodes and the first manifest's
    simulator config (resolution, cameras), checking that all datasets agree on it.

    Every episode file of every dataset is checked against its manifest checksum before
    anything is decoded (CorruptEpisodeError naming the file; unchanged files are checked
    once per process)."""
    logs = [DrivingLog(path, verify=True) for path in paths]
    episodes, reference = [], None
    for path, log in zip(paths, logs):
        manifest = log.manifest
        have = tuple(manifest["cameras"])
        missing = [c for c in cameras if c not in have]
        if missing:
            raise ValueError(f"{path}: dataset has cameras {list(have)} but training needs {missing}; "
                             "record with --cameras center,left,right or train with --camera center")
        resolution = tuple(manifest["resolution"])
        if reference is None:
            reference = {"resolution": resolution, "config": manifest.get("config", {})}
        elif resolution != reference["resolution"]:
            raise ValueError(f"{path}: resolution {resolution} differs from the first dataset's "
                             f"{reference['resolution']}; train on datasets recorded at one resolution")
        for index in log.episodes:
            data = log.read_episode(index, cameras=list(cameras))
            episodes.append(Episode(source=str(path), index=index,
                                    frames={c: data[f"frames/{c}"] for c in cameras},
                                    steering=data["expert_steering"].astype(np.float32),
                                    speed=data["speed"].astype(np.float32),
                                    throttle=data["throttle"].astype(np.float32),
                                    executed=data["steering"].astype(np.float32)))
    if not episodes:
        raise ValueError(f"no episodes in {paths}; record some with `steerloop record`")
    return episodes, reference


def split_episodes(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Episode-level split (never by frame): a seeded permutation, at least one episode each side."""
    if n < 2:
        raise ValueError(f"need at least 2 episodes for a train/validation split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def windows(episodes: list[Episode], which: list[int], length: int, stride: int) -> np.ndarray:
    """(M, 2) array of (episode, start) for every window of ``length`` steps, ``stride`` apart."""
    out = []
    for e in which:
        n = len(episodes[e])
        starts = range(0, max(n - length, 0) + 1, stride) if n >= length else []
        out += [(e, s) for s in starts]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def previous(series: np.ndarray, start: int, length: int) -> np.ndarray:
    """``series`` one step back over the window [start, start + length): the value at t-1
    for each t, 0 before the episode's first step (nothing was executed yet)."""
    out = np.zeros(length, dtype=np.float32)
    lo = max(start - 1, 0)
    values = series[lo:start + length - 1]
    out[length - len(values):] = values
    return out


class BatchMaker:
    """Cuts windows into model batches: camera choice, viewpoint shift, jitter, preprocessing.

    Besides the images and labels, a batch holds the logged values one step back that
    models with fed-back inputs are trained on: ``prev_steering`` (the command executed at
    t-1, not the label: under DART noise they differ), ``prev_speed``, ``prev_throttle``.
    A viewpoint shift changes the label, never these: the car did execute them. With
    ``weights`` (one (N,) array per episode), training batches (those made with an
    ``rng``) carry ``weight`` (B, T) for the loss."""

    def __init__(self, episodes: list[Episode], length: int, preprocess_config: PreprocessConfig,
                 camera_spec: CameraSpec, cameras: tuple[str, ...], augment: tuple[str, ...],
                 weights: list[np.ndarray] | None = None):
        unknown = [a for a in augment if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; choose from {AUGMENTATIONS}")
        self.episodes = episodes
        self.length = length
        self.preprocess_config = preprocess_config
        self.camera_spec = camera_spec
        self.cameras = cameras
        self.augment = augment
        self.weights = weights

    def raw(self, batch_windows: np.ndarray, rng: np.random.Generator | None):
        """Augmented uint8 frames (B, T, H, W, 3) and their labels; no augmentation without ``rng``."""
        T = self.length
        images, steering, speed, throttle = [], [], [], []
        for e, start in batch_windows:
            ep = self.episodes[e]
            sl = slice(start, start + T)
            camera, shift, yaw = "center", 0.0, 0.0
            if rng is not None and "side" in self.augment and len(self.cameras) > 1:
                camera = self.cameras[int(rng.integers(len(self.cameras)))]
                shift = CAMERA_SHIFTS[camera]
            frames = ep.frames[camera][sl]
            if rng is not None and "shift" in self.augment and rng.uniform() < SHIFT_PROBABILITY:
                extra_shift, yaw = rng.uniform(-SHIFT_RANGE, SHIFT_RANGE), rng.uniform(-YAW_RANGE, YAW_RANGE)
                frames = np.stack([warp_viewpoint(f, self.camera_spec, extra_shift, yaw) for f in frames])
                shift += extra_shift
            if rng is not None and "jitter" in self.augment:
                frames = photometric_jitter(frames, rng)
            label = ep.steering[sl]
            if shift or yaw:
                label = corrective_label(label, ep.speed[sl], shift, yaw)
            images.append(frames)
            steering.append(label)
            speed.append(ep.speed[sl])
            throttle.append(ep.throttle[sl])
        return np.stack(images), np.stack(steering), np.stack(speed), np.stack(throttle)

    def logged_history(self, batch_windows: np.ndarray) -> dict[str, np.ndarray]:
        """``prev_steering`` (executed), ``prev_speed``, ``prev_throttle``: (B, T) each."""
        T = self.length
        out = {"prev_steering": [], "prev_speed": [], "prev_throttle": []}
        for e, start in batch_windows:
            ep = self.episodes[e]
            out["prev_steering"].append(previous(ep.executed, start, T))
            out["prev_speed"].append(previous(ep.speed, start, T))
            out["prev_throttle"].append(previous(ep.throttle, start, T))
        return {key: np.stack(values).reshape(len(batch_windows), T) for key, values in out.items()}

    def __call__(self, batch_windows: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        images, steering, speed, throttle = self.raw(batch_windows, rng)
        batch = {
            "images": torch.from_numpy(preprocess(images, self.preprocess_config)),  # (B, T, 3, h, w)
            "steering": torch.from_numpy(steering),  # (B, T)
            "speed": torch.from_numpy(speed),  # (B, T)
            "throttle": torch.from_numpy(throttle),  # (B, T)
        }
        batch.update({key: torch.from_numpy(value) for key, value in self.logged_history(batch_windows).items()})
        if self.weights is not None and rng is not None:
            T = self.length
            batch["weight"] = torch.from_numpy(np.stack([self.weights[e][s:s + T] for e, s in batch_windows]
                                                        ).astype(np.float32))
        return batch
