"""A learned steering model behind the stable-baselines3 ``predict`` contract.

Closed loop steps the model once per frame (``model.step``, O(1)); a recurrent model's
memory travels in the ``state`` returned by ``predict`` as a tuple of numpy arrays (it
pickles, and matches SB3's RecurrentPPO style), and is reset to the initial state for the
environments whose ``episode_start`` is true.

A model with fed-back inputs (``prev_steering``, Komanda's outputs) keeps its own
previous outputs as the last array of that state, so its next input is always what it
predicted itself, never a logged or expert value, and batched lockstep rollouts
(``select_state``) keep each environment's own history.
"""

from __future__ import annotations

import numpy as np
import torch

from steerloop.agents.models import ModelConfig, SteeringModel, count_parameters
from steerloop.agents.preprocess import preprocess_channels_last
from steerloop.agents.protocol import PolicyBase


class LearnedPolicy(PolicyBase):
    """SB3-style predictor around a :class:`agents.models.SteeringModel`."""

    requires_privileged = False

    def __init__(self, model: SteeringModel, config: ModelConfig, device: str | torch.device = "cpu"):
        if model.config.to_dict() != config.to_dict():
            raise ValueError("LearnedPolicy: the ModelConfig passed differs from the one the model was built "
                             "with; pass model.config (or load both with agents.checkpoint.load_checkpoint)")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for module in self.model.modules():  # oneDNN convolves NHWC faster on CPU (same results to ~1e-8)
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        self.config = config
        self.recurrent = bool(model.recurrent)
        self.checkpoint: str | None = None  # set by load_policy_from_checkpoint
        self._one_env_shapes: list[tuple[int, ...]] | None = None  # state shapes for 1 env, filled on first use

    def reset(self) -> None:
        """No-op: the recurrent state lives in ``state`` (reset through ``episode_start``)."""

    def initial_state(self, n_envs: int) -> tuple[np.ndarray, ...] | None:
        """The episode-start state for ``n_envs`` environments (None for single-frame models)."""
        state = self.model.initial_state(n_envs)
        return None if state is None else tuple(s.cpu().numpy() for s in state)

    def select_state(self, state: tuple[np.ndarray, ...] | None, keep: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """The state of the environments where ``keep`` ((N,) bool) is true, in order, so a
        batched rollout can stop calling the model for environments whose episode ended."""
        if state is None:
            return None
        keep = np.asarray(keep, dtype=bool)
        return tuple(np.compress(keep, s, axis=axis) for s, axis in zip(state, self.model.state_batch_dims))

    def _reset_envs(self, state: tuple[np.ndarray, ...], starts: np.ndarray) -> tuple[np.ndarray, ...]:
        initial = self.initial_state(len(starts))
        out = []
        for arr, init, axis in zip(state, initial, self.model.state_batch_dims):
            arr = np.array(arr, dtype=np.float32, copy=True)
            moved, init = np.moveaxis(arr, axis, 0), np.moveaxis(init, axis, 0)  # views, batch first
            moved[starts] = init[starts]
            out.append(arr)
        return tuple(out)

    def _state_shapes(self, n: int) -> list[tuple[int, ...]]:
        """Shapes of the state arrays for ``n`` environments (the batch axis set to ``n``)."""
        if self._one_env_shapes is None:
            self._one_env_shapes = [s.shape for s in self.initial_state(1)]
        shapes = []
        for shape, axis in zip(self._one_env_shapes, self.model.state_batch_dims):
            shape = list(shape)
            shape[axis] = n
            shapes.append(tuple(shape))
        return shapes

    def _check_state(self, state, n: int) -> tuple[np.ndarray, ...]:
        expected = self._state_shapes(n)
        if not isinstance(state, (tuple, list)) or len(state) != len(expected):
            raise ValueError(f"state must be the tuple of {len(expected)} arrays returned by a previous predict "
                             f"call (or None at the start of an episode), got {type(state).__name__}")
        state = tuple(np.asarray(s, dtype=np.float32) for s in state)
        if [s.shape for s in state] != expected:
            raise ValueError(f"state arrays have shapes {[x.shape for x in state]}, expected {expected} for {n} "
                             f"environment(s); the number of environments changed or the state comes from "
                             f"another model: pass state=None")
        return state

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """SB3 contract: actions (N, 1) float32 for batched images (N, H, W, 3), (1,) for a
        single image (H, W, 3), clipped to [-1, 1]; and the next state."""
        if not isinstance(observation, dict) or "image" not in observation:
            raise KeyError("LearnedPolicy.predict needs a dict observation with 'image' (H, W, 3) or "
                           "(N, H, W, 3) uint8, as returned by steerloop/LaneKeep-v0")
        image = np.asarray(observation["image"])
        if image.ndim not in (3, 4):
            raise ValueError(f"observation['image'] must be (H, W, 3) or (N, H, W, 3), got shape {image.shape}")
        batched = image.ndim == 4
        images = image if batched else image[None]  # (N, H, W, 3)
        n = images.shape[0]
        hwc = preprocess_channels_last(images, self.config.preprocess)  # (N, h, w, 3)
        x = torch.from_numpy(hwc).permute(0, 3, 1, 2).to(self.device)  # (N, 3, h, w), channels-last memory

        speed = None
        if self.model.sensors:
            if "speed" not in observation:
                raise KeyError("this model has the 'speed' input: the observation needs 'speed' (N, 1) [m/s], "
                               "as returned by steerloop/LaneKeep-v0")
            speed = torch.from_numpy(np.asarray(observation["speed"], np.float32).reshape(n)).to(self.device)
        torch_state = None
        if self.recurrent:
            if state is None:
                state = self.initial_state(n)
            else:
                state = self._check_state(state, n)
                if episode_start is not None:
                    starts = np.asarray(episode_start, dtype=bool).reshape(-1)
                    if starts.shape != (n,):
                        raise ValueError(f"episode_start must have one flag per environment ({n}), "
                                         f"got shape {np.asarray(episode_start).shape}")
                    if starts.any():
                        state = self._reset_envs(state, starts)
            torch_state = tuple(torch.from_numpy(np.ascontiguousarray(s)).to(self.device) for s in state)

        with torch.inference_mode():
            steering, next_state = self.model.step(x, torch_state, speed=speed)  # (N,)
        actions = np.clip(steering.cpu().numpy().astype(np.float32), -1.0, 1.0)[:, None]  # (N, 1)
        if self.recurrent:
            state = tuple(s.cpu().numpy() for s in next_state)
        return (actions if batched else actions[0]), state

    def describe(self) -> dict:
        d = {"kind": "learned", "arch": self.config.arch, "recurrent": self.recurrent,
             "inputs": list(self.config.inputs), "fed_back": list(self.model.feedback),
             "parameters": count_parameters(self.model), "model": self.config.to_dict()}
        if self.checkpoint is not None:
            d["checkpoint"] = self.checkpoint
        return d
