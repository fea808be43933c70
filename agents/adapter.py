"""A plain model as a steerloop policy, in one line.

:class:`ModelPolicy` wraps a ``torch.nn.Module`` (or any function) that maps a batch of
images (and optionally the speed) to steering, with the preprocessing the user names::

    from steerloop import ModelPolicy

    policy = ModelPolicy(net, crop_top=20, resize=(66, 200), colour="yuv", mean=0.5, std=0.5)

Camera frames arrive as uint8 RGB (N, H, W, 3); they are cropped, resized (OpenCV,
``INTER_AREA``), converted to the named colour space, scaled to [0, 1] (``scale``),
normalised per channel with ``mean``/``std``, laid out channels first (or last) and given
to the model as a float32 torch tensor (a numpy array with ``inputs="numpy"``). The model
returns (N,) or (N, 1) steering in [-1, 1].
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from steerloop.agents.protocol import PolicyBase

COLOURS = {"rgb": None, "bgr": cv2.COLOR_RGB2BGR, "yuv": cv2.COLOR_RGB2YUV, "hsv": cv2.COLOR_RGB2HSV,
           "gray": cv2.COLOR_RGB2GRAY}
LAYOUTS = ("first", "last")
INPUTS = ("torch", "numpy")


def _per_channel(value, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32).reshape(-1)
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"ModelPolicy: {name} must be a finite number or one per channel, got {value!r}")
    return array


class ModelPolicy(PolicyBase):
    """``model(images[, speed]) -> steering`` as a policy (see the module docstring).

    ``resize`` (height, width) [px] after cropping (None keeps the size); ``colour`` one of
    rgb, bgr, yuv, hsv, gray; ``scale`` multiplies the uint8 values (1/255: [0, 1]); ``mean``
    and ``std`` a number or one per channel; ``channels`` "first" (N, C, h, w) or "last";
    ``speed`` also passes ``observation["speed"]`` (N, 1) as a second argument;
    ``image_size`` (H, W) the camera resolution the model expects (None: any).
    """

    def __init__(self, model: Callable, *, crop_top: int = 0, crop_bottom: int = 0,
                 resize: Sequence[int] | None = None, colour: str = "rgb", scale: float = 1.0 / 255.0,
                 mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0, channels: str = "first",
                 speed: bool = False, inputs: str = "torch", image_size: Sequence[int] | None = None):
        if not callable(model):
            raise ValueError(f"ModelPolicy: model must be a torch.nn.Module or a function, got {type(model).__name__}")
        if colour not in COLOURS:
            raise ValueError(f"ModelPolicy: colour must be one of {sorted(COLOURS)}, got {colour!r}")
        if channels not in LAYOUTS or inputs not in INPUTS:
            raise ValueError(f"ModelPolicy: channels must be one of {LAYOUTS} and inputs one of {INPUTS}, got "
                             f"{channels!r} and {inputs!r}")
        for name, value in (("crop_top", crop_top), ("crop_bottom", crop_bottom)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelPolicy: {name} must be an integer >= 0 (pixel rows), got {value!r}")
        self.model = model
        self.crop_top, self.crop_bottom = crop_top, crop_bottom
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.colour, self.scale, self.channels, self.speed, self.inputs = colour, float(scale), channels, speed, inputs
        self.mean, self.std = _per_channel(mean, "mean"), _per_channel(std, "std")
        if np.any(self.std == 0):
            raise ValueError("ModelPolicy: std may not be 0")
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        if hasattr(model, "eval"):  # a torch module: inference behaviour (dropout off, batch-norm statistics)
            model.eval()

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, H, W, 3) -> float32 model input (N, C, h, w) (or (N, h, w, C))."""
        images = np.asarray(images)
        height = images.shape[1]
        cropped = images[:, self.crop_top:height - self.crop_bottom]
        frames = []
        for frame in cropped:
            frame = np.ascontiguousarray(frame)
            if self.resize is not None:
                frame = cv2.resize(frame, (self.resize[1], self.resize[0]), interpolation=cv2.INTER_AREA)
            if COLOURS[self.colour] is not None:
                frame = cv2.cvtColor(frame, COLOURS[self.colour])
            frames.append(frame.reshape(*frame.shape[:2], -1))  # (h, w, C)
        x = np.stack(frames).astype(np.float32) * np.float32(self.scale)  # (N, h, w, C)
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(np.moveaxis(x, -1, 1) if self.channels == "first" else x, dtype=np.float32)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """(steering (N, 1), None) for a batch of observations."""
        x = self.preprocess(observation["image"])
        args = [x]
        if self.speed:
            args.append(np.asarray(observation["speed"], np.float32).reshape(len(x), 1))
        if self.inputs == "numpy":
            return self._as_actions(self.model(*args)), state
        import torch

        with torch.inference_mode():
            out = self.model(*(torch.from_numpy(a) for a in args))
        return self._as_actions(out), state

    @staticmethod
    def _as_actions(out) -> np.ndarray:
        if type(out).__module__ == "torch":
            out = out.detach().cpu().numpy()
        out = np.asarray(out)
        return out.reshape(-1, 1) if out.ndim == 1 else out

    def select_state(self, state, keep: np.ndarray):
        """Stateless: a finished environment simply leaves the batch."""
        return state

    def _settings(self) -> dict:
        return {"crop_top": self.crop_top, "crop_bottom": self.crop_bottom, "resize": self.resize,
                "colour": self.colour, "scale": self.scale, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "channels": self.channels, "speed": self.speed, "inputs": self.inputs, "image_size": self.image_size}

    def describe(self) -> dict:
        parameters = getattr(self.model, "parameters", None)
        d = {"kind": "model", "class": type(self.model).__qualname__ if parameters else self.model.__qualname__,
             "preprocess": self._settings()}
        if parameters:
            d["parameters"] = int(sum(p.numel() for p in parameters()))
        return d

    def cache_key(self) -> str:
        """A hash of the model's source file, its weights (``state_dict``) and the preprocessing."""
        digest = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        owner = self.model if inspect.isroutine(self.model) else type(self.model)
        try:
            digest.update(inspect.getsource(inspect.getmodule(owner)).encode())
        except (TypeError, OSError):
            digest.update(owner.__qualname__.encode())
        state_dict = getattr(self.model, "state_dict", None)
        for name, tensor in sorted(state_dict().items()) if state_dict else ():
            digest.update(name.encode() + b"\0" + tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
