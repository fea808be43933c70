"""stable-baselines3 models (``.zip``) as steerloop policies.

SB3 models already implement the ``predict`` contract; this adapter loads one on the CPU
and adds the attributes steerloop's runner reads. Loading goes through SB3's own
``load``, which reads weights with ``torch.load(weights_only=True)``. Which class loads a
file is read from the policy class recorded in the zip's JSON ``data`` (nothing is
unpickled for that): sb3-contrib's RecurrentPPO (LSTM state carried in ``state``) or one
of stable-baselines3's algorithms.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from steerloop.agents.protocol import PolicyBase

ALGORITHMS = ("PPO", "A2C", "SAC", "TD3", "DDPG")
CONTRIB_ALGORITHMS = ("RecurrentPPO",)
RL_INSTALL_HINT = 'pip install "steerloop[rl]"'


def _policy_module(path: Path) -> str:
    """The module of the policy class a SB3 zip was saved with ('' if it does not say)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a stable-baselines3 model zip ({type(error).__name__}: {error})") from None
    return str(data.get("policy_class", {}).get("__module__", ""))


class SB3Policy(PolicyBase):
    requires_privileged = False

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"stable-baselines3 model {path} does not exist")
        if _policy_module(path).startswith("sb3_contrib.common.recurrent"):
            try:
                import sb3_contrib
            except ImportError:
                raise ValueError(f"{path} is a RecurrentPPO model from sb3-contrib, which is not installed; "
                                 f"install it with: {RL_INSTALL_HINT}") from None
            self.model = sb3_contrib.RecurrentPPO.load(str(path), device="cpu")
            self.algorithm = "RecurrentPPO"
        else:
            import stable_baselines3

            errors = []
            for name in ALGORITHMS:
                try:
                    self.model = getattr(stable_baselines3, name).load(str(path), device="cpu")
                    self.algorithm = name
                    break
                except Exception as error:  # noqa: BLE001 - try the next algorithm, report all if none fits
                    errors.append(f"{name}: {type(error).__name__}")
            else:
                raise ValueError(f"{path} is not a stable-baselines3 model any of {ALGORITHMS} can load ({errors})")
        self.path = str(path)
        self.recurrent = self.algorithm in CONTRIB_ALGORITHMS
        self.image_size = self._image_size()

    def _image_size(self) -> tuple[int, int] | None:
        """(H, W) of the camera images the model was trained on, if its observation has an image."""
        space = self.model.observation_space
        image = space["image"] if hasattr(space, "spaces") and "image" in space.spaces else None
        if image is None or len(image.shape) != 3:
            return None
        shape = image.shape
        return (shape[1], shape[2]) if shape[0] == 3 else (shape[0], shape[1])  # channels first or last

    def reset(self) -> None:
        """No-op: a recurrent model's LSTM state travels in ``state`` (reset through ``episode_start``)."""

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        if self.image_size is not None and isinstance(observation, dict) and "image" in observation:
            got = tuple(np.shape(observation["image"])[-3:-1])
            if got != self.image_size:
                height, width = self.image_size
                raise ValueError(f"{self.path} was trained on {height}x{width} camera images, got "
                                 f"{got[0]}x{got[1]}: evaluate it with --resolution {height}x{width}")
        return self.model.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)

    def describe(self) -> dict:
        return {"kind": "sb3", "algorithm": self.algorithm, "path": self.path, "recurrent": self.recurrent}
