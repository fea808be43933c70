"""Learned steering models: PilotNet, CNN+LSTM, Conv3D+LSTM, and the Udacity challenge
winners' designs, Komanda (1st place) and Chauffeur (3rd place).

Every model shares one interface, so the trainer, the policy wrapper and the checkpoint
code are generic across architectures:

- ``forward(batch) -> (loss, metrics)`` on a batch of windows (B, T, 3, h, w);
- ``predict_sequence(images, state=None) -> (steering (B, T), state)``, the window pass;
- ``step(image, state) -> (steering (B,), state)``, one frame per call in closed loop,
  O(1) per step: recurrent state carries everything the model remembers;
- ``initial_state(batch_size)``: the episode-start state (``None`` for a PilotNet that
  sees frames only).

``step`` is ``predict_sequence`` on a window of length 1, so stepping frame by frame from
``initial_state`` gives the same outputs as the window pass (up to float rounding).

Inputs beside the image (``ModelConfig.inputs``): ``speed`` (the measured speed at t, a
sensor) and ``prev_steering`` (the steering command executed at t-1). ``prev_steering``
is *fed back*: in closed loop it is the model's own previous output, kept as the last
entry of its state, never a logged or expert value. Komanda feeds back all three of its
outputs (steering, speed, throttle). In training the fed-back inputs are the logged
values (teacher forcing), the model's own predictions with a probability (scheduled
sampling), or dropped with a probability (past-input dropout): see :meth:`outputs`.

Small inputs: every conv layer keeps its nominal (unpadded) NVIDIA geometry when the input
is large enough; a spatial dimension smaller than the kernel gets the minimal symmetric
zero padding that fits it (``_conv_geometry``). The nominal 66x200 input therefore uses the
exact PilotNet layout, and tiny test inputs (e.g. 20x40) still yield >= 1x1 feature maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from steerloop.agents.preprocess import PreprocessConfig
from steerloop.errors import SteerloopError, check_keys, suggest

ARCHS = ("pilotnet", "cnn-lstm", "conv3d-lstm", "komanda", "chauffeur")
INPUTS = ("image", "prev_steering", "speed")  # in this order in ModelConfig.inputs
KOMANDA_OUTPUTS = ("steering", "speed", "throttle")  # Komanda's heads, every one fed back at the next step
ADDED_FIELDS = {"inputs": ("image",)}
"""ModelConfig fields added after checkpoints were first written, with the value that
reproduces the models saved without them (a config.json lacking one loads with it)."""


@dataclass
class ModelConfig:
    """Architecture and preprocessing of a learned steering model (stored in config.json)."""

    arch: str = "pilotnet"
    """One of "pilotnet" (single frame), "cnn-lstm" (per-frame CNN + LSTM), "conv3d-lstm" (3D conv + LSTM),
    "komanda" (3D conv + LSTM + simple RNN, outputs fed back), "chauffeur" (frozen frame encoder + LSTM)."""
    inputs: tuple[str, ...] = ("image",)
    """What the model sees: "image" (always), "prev_steering" (the command executed at t-1, fed back from the
    model's own output in closed loop), "speed" (measured speed at t). Komanda always has prev_steering."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """How raw camera frames become network inputs; fixes the input size (3, *preprocess.resize)."""
    hidden: int = 64
    """LSTM hidden size (recurrent archs)."""
    lstm_layers: int = 1
    """Number of stacked LSTM layers (recurrent archs)."""
    feature_dim: int = 128
    """Size of the per-frame CNN feature fed to the LSTM (recurrent archs)."""
    frame_stack: int = 4
    """conv3d-lstm: consecutive frames covered by the temporal extent of the 3D convolution."""
    dropout: float = 0.1
    """Dropout probability on FC features (and between stacked LSTM layers); 0 disables it."""
    steering_weight: float = 1.0
    """Weight of the steering MSE in the loss."""
    aux_speed_weight: float = 0.1
    """conv3d-lstm: weight of the auxiliary speed MSE (applied only when the batch has "speed")."""
    aux_throttle_weight: float = 0.1
    """conv3d-lstm: weight of the auxiliary throttle MSE (applied only when the batch has "throttle")."""
    speed_scale: float = 10.0
    """[m/s] speed labels are divided by this before the auxiliary MSE, so the term is O(1)."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {ARCHS}")
        self.inputs = _check_inputs(self.inputs, self.arch)
        if isinstance(self.preprocess, dict):
            self.preprocess = PreprocessConfig.from_dict(self.preprocess)
        if not isinstance(self.preprocess, PreprocessConfig):
            raise TypeError(f"ModelConfig.preprocess must be a PreprocessConfig, got {type(self.preprocess).__name__}")
        for name in ("hidden", "lstm_layers", "feature_dim", "frame_stack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("steering_weight", "aux_speed_weight", "aux_throttle_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ModelConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.steering_weight == 0:
            raise ValueError("ModelConfig.steering_weight must be > 0: the model exists to predict steering")
        if not (math.isfinite(self.speed_scale) and self.speed_scale > 0):
            raise ValueError(f"ModelConfig.speed_scale must be > 0 [m/s], got {self.speed_scale!r}")

    @property
    def recurrent(self) -> bool:
        """The architecture has recurrent layers (a model may also carry state for its fed-back inputs)."""
        return self.arch != "pilotnet"

    @property
    def feedback(self) -> tuple[str, ...]:
        """Outputs fed back as inputs at the next step: Komanda's three heads, else steering
        when ``prev_steering`` is an input."""
        if self.arch == "komanda":
            return KOMANDA_OUTPUTS
        return ("steering",) if "prev_steering" in self.inputs else ()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["preprocess"] = self.preprocess.to_dict()
        d["inputs"] = list(self.inputs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict, got {type(d).__name__}")
        check_keys(d, [f.name for f in fields(cls)], "model config")
        if "arch" in d and d["arch"] not in ARCHS:
            raise SteerloopError(f"model config: unknown arch {d['arch']!r}{suggest(str(d['arch']), ARCHS)}; "
                                 f"choose one of {ARCHS}")
        d = dict(d)
        if "preprocess" in d:
            d["preprocess"] = PreprocessConfig.from_dict(d["preprocess"])
        if isinstance(d.get("inputs"), list):
            d["inputs"] = tuple(d["inputs"])
        return cls(**d)


def _check_inputs(inputs, arch: str) -> tuple[str, ...]:
    """``inputs`` as a tuple in INPUTS order; Komanda's implied prev_steering added."""
    if isinstance(inputs, str) or not isinstance(inputs, (tuple, list)):
        raise SteerloopError(f"ModelConfig.inputs must be a list of names from {INPUTS}, got {inputs!r}")
    for name in inputs:
        if name not in INPUTS:
            raise SteerloopError(f"ModelConfig.inputs: unknown input {name!r}{suggest(str(name), INPUTS)}; "
                                 f"choose from {INPUTS}")
    if "image" not in inputs:
        raise SteerloopError(f"ModelConfig.inputs must include 'image' (every architecture is a camera model), "
                             f"got {list(inputs)}")
    if len(set(inputs)) != len(inputs):
        raise SteerloopError(f"ModelConfig.inputs lists an input twice: {list(inputs)}")
    wanted = set(inputs) | ({"prev_steering"} if arch == "komanda" else set())
    return tuple(name for name in INPUTS if name in wanted)


# ---------------------------------------------------------------------------------------------
# building blocks


def _conv_geometry(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(padding, output size) of one conv along one dim: no padding if the kernel fits,
    else the minimal symmetric zero padding with size + 2 * padding >= kernel."""
    padding = 0 if size >= kernel else math.ceil((kernel - size) / 2)
    return padding, (size + 2 * padding - kernel) // stride + 1


def _conv_trunk(in_channels: int, hw: tuple[int, int], specs) -> tuple[nn.Sequential, tuple[int, int]]:
    """Conv2d + ELU layers from ``specs`` [(out_channels, kernel, stride), ...]; returns the
    trunk and the output (height, width) for an input of spatial size ``hw``."""
    layers = []
    for out_channels, kernel, stride in specs:
        (pad_h, out_h), (pad_w, out_w) = _conv_geometry(hw[0], kernel, stride), _conv_geometry(hw[1], kernel, stride)
        layers += [nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(pad_h, pad_w)), nn.ELU()]
        in_channels, hw = out_channels, (out_h, out_w)
    return nn.Sequential(*layers), hw


PILOTNET_CONVS = ((24, 5, 2), (36, 5, 2), (48, 5, 2), (64, 3, 1), (64, 3, 1))
ENCODER_CONVS = ((24, 5, 2), (32, 5, 2), (48, 5, 2), (64, 3, 1))  # the smaller trunk of the recurrent archs
POOL_GRID = (2, 8)  # (rows, cols) of the adaptive pooling: keeps coarse horizontal position (lane lines)


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error (``weight`` >= 0, e.g. a boolean mask; 0 if every weight is 0)."""
    w = weight.to(pred.dtype)
    return ((pred - target) ** 2 * w).sum() / w.sum().clamp(min=1e-12)


def _drop(values: torch.Tensor, probability: float) -> torch.Tensor:
    """Past-input dropout (ChauffeurNet): each step's fed-back values (..., F) are zeroed
    with ``probability``, all channels of a step together."""
    if probability <= 0.0:
        return values
    keep = torch.rand(values.shape[:-1], device=values.device) >= probability  # (...,)
    return values * keep.unsqueeze(-1).to(values.dtype)


class SteeringModel(nn.Module):
    """Shared interface. Subclasses implement two parts:

    - ``encode(images (B, T, 3, h, w), state) -> (features (B, T, F), state)``: everything
      that depends on the frames only (it runs on a whole window at once);
    - ``core(x (B, T, F + extra), state) -> (outputs dict of (B, T), state)``: the part that
      sees the inputs beside the image (the recurrent layers and the heads).

    ``state`` is the architecture's tuple (``initial_core_state``); a model with fed-back
    inputs appends one (B, len(feedback)) tensor, its own previous outputs.
    """

    recurrent: bool = False
    state_batch_dims: tuple[int, ...] = ()
    """Batch axis of each state tensor (how the policy resets single environments)."""
    aux_heads: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.input_shape = config.preprocess.output_shape  # (3, h, w)
        self.feedback = config.feedback
        self.sensors = tuple(name for name in ("speed",) if name in config.inputs)
        self.extra_inputs = len(self.sensors) + len(self.feedback)  # inputs beside the image features
        if self.feedback:  # its own previous outputs are state, even without recurrent layers
            self.recurrent = True
            self.state_batch_dims = type(self).state_batch_dims + (0,)

    def initial_core_state(self, batch_size: int, device=None):
        """The architecture's episode-start state (``None`` for stateless architectures)."""
        return None

    def initial_state(self, batch_size: int, device: torch.device | str | None = None):
        """Episode-start state for ``batch_size`` environments; ``None`` for stateless models.
        Fed-back inputs start at 0 (nothing executed before the first step)."""
        core = self.initial_core_state(batch_size, device)
        if not self.feedback:
            return core
        return (*(core or ()), torch.zeros(batch_size, len(self.feedback), device=device))

    def encode(self, images: torch.Tensor, state):
        raise NotImplementedError

    def core(self, x: torch.Tensor, state):
        raise NotImplementedError

    def fed_back(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The outputs fed back at the next step, (B, T, len(feedback)); speed in units of speed_scale."""
        return torch.stack([out[name] for name in self.feedback], dim=-1)

    def outputs(self, images: torch.Tensor, state, speed: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None, own_probability: float = 0.0,
                drop_probability: float = 0.0) -> tuple[dict[str, torch.Tensor], object]:
        """All heads on a window; the fed-back inputs at step t are

        - ``teacher[:, t]`` (B, F) (the logged values at t-1: teacher forcing) when
          ``teacher`` is given and ``own_probability`` is 0;
        - the model's own outputs at t-1 (free running: closed loop, and ``teacher=None``),
          starting from the previous outputs kept in ``state``;
        - with ``teacher`` and ``own_probability`` p > 0 (scheduled sampling, Bengio et al.
          2015): the model's own output with probability p per window and step, else the
          logged value; step 0 of a window always gets the logged value (the model has not
          predicted the step before it). Own outputs are fed back without gradient.

        ``drop_probability`` zeroes each step's fed-back inputs with that probability
        (past-input dropout, ChauffeurNet). ``speed`` (B, T) [m/s] is the measured speed
        for models with the ``speed`` input.
        """
        b, t = images.shape[:2]
        if state is None:
            state = self.initial_state(b, images.device)
        core_state, prev = (tuple(state[:-1]), state[-1]) if self.feedback else (state, None)
        features, core_state = self.encode(images, core_state)  # (B, T, F)
        if self.sensors:
            if speed is None or tuple(speed.shape) != (b, t):
                got = None if speed is None else tuple(speed.shape)
                raise ValueError(f"this model has the 'speed' input: pass speed shaped (B, T) = {(b, t)}, got {got}")
            features = torch.cat([features, (speed / self.config.speed_scale).unsqueeze(-1).to(features.dtype)], -1)
        if not self.feedback:
            return self.core(features, core_state)
        if teacher is not None and tuple(teacher.shape) != (b, t, len(self.feedback)):
            raise ValueError(f"teacher values must be shaped (B, T, F) = {(b, t, len(self.feedback))} "
                             f"(fed back: {self.feedback}), got {tuple(teacher.shape)}")
        if teacher is not None and own_probability <= 0.0:
            fed = _drop(teacher.to(features.dtype), drop_probability)  # (B, T, F)
            out, core_state = self.core(torch.cat([features, fed], -1), core_state)
        else:
            out, core_state = self._unroll(features, core_state, prev, teacher, own_probability, drop_probability)
        return out, (*core_state, self.fed_back(out)[:, -1].detach())

    def _unroll(self, features, core_state, prev, teacher, own_probability, drop_probability):
        """Step through the window, each step's fed-back inputs chosen as :meth:`outputs` says."""
        b, t = features.shape[:2]
        steps = []
        for i in range(t):
            if teacher is not None and (i == 0 or own_probability < 1.0):
                logged = teacher[:, i].to(features.dtype)
                if i == 0:
                    prev = logged
                else:
                    own = torch.rand(b, 1, device=features.device) < own_probability
                    prev = torch.where(own, prev, logged)
            fed = _drop(prev, drop_probability)  # (B, F)
            out, core_state = self.core(torch.cat([features[:, i:i + 1], fed.unsqueeze(1)], -1), core_state)
            steps.append(out)
            prev = self.fed_back(out)[:, 0].detach()
        return {key: torch.cat([s[key] for s in steps], 1) for key in steps[0]}, core_state

    def _check_images(self, images: torch.Tensor, ndim: int, what: str) -> None:
        shape = "(B, T, 3, h, w)" if ndim == 5 else "(B, 3, h, w)"
        if not isinstance(images, torch.Tensor) or images.ndim != ndim or tuple(images.shape[-3:]) != self.input_shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{what} expects preprocessed images shaped {shape} with (3, h, w) = "
                             f"{self.input_shape} (from ModelConfig.preprocess.resize), got {got}; "
                             f"run agents.preprocess.preprocess with the model's PreprocessConfig")

    def predict_sequence(self, images: torch.Tensor, state=None, speed: torch.Tensor | None = None,
                         teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        """Window pass: images (B, T, 3, h, w) -> steering (B, T) in [-1, 1], final state.
        Fed-back inputs: ``teacher`` (B, T, F) if given, else the model's own outputs."""
        self._check_images(images, 5, "predict_sequence")
        out, state = self.outputs(images, state, speed=speed, teacher=teacher)
        return out["steering"], state

    def step(self, image: torch.Tensor, state, speed: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        """One closed-loop frame: image (B, 3, h, w) (and speed (B,)) -> steering (B,), next
        state. O(1). The fed-back inputs are the model's own previous outputs, from ``state``."""
        self._check_images(image, 4, "step")
        speed = None if speed is None else speed.reshape(-1, 1)
        out, state = self.outputs(image.unsqueeze(1), state, speed=speed)  # (B, 1, 3, h, w)
        return out["steering"][:, 0], state

    def teacher_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logged values of the fed-back inputs, (B, T, F): ``prev_steering`` (the command
        executed at t-1), ``prev_speed`` / speed_scale, ``prev_throttle``."""
        values = []
        for name in self.feedback:
            key = f"prev_{name}"
            if key not in batch:
                raise KeyError(f"batch is missing {key!r}: a model fed back {self.feedback} trains on the logged "
                               f"values at t-1 (training.data.BatchMaker adds them); got keys {sorted(batch)}")
            values.append(batch[key] / (self.config.speed_scale if name == "speed" else 1.0))
        return torch.stack(values, dim=-1)

    def forward(self, batch: dict[str, torch.Tensor], own_probability: float = 0.0,
                drop_probability: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Training/validation loss on a batch of windows; metrics are python floats.

        Fed-back inputs are the logged ones (``prev_*`` keys) unless ``own_probability`` or
        ``drop_probability`` say otherwise (see :meth:`outputs`). ``batch["weight"]`` (B, T),
        if present, weights each frame's losses (keyframe weighting)."""
        for key in ("images", "steering"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r}: forward needs 'images' (B, T, 3, h, w) and "
                               f"'steering' (B, T); got keys {sorted(batch)}")
        images = batch["images"]
        self._check_images(images, 5, "forward")
        bt = tuple(images.shape[:2])
        for key in ("steering", "speed", "throttle", "mask", "weight", "prev_steering", "prev_speed", "prev_throttle"):
            if key in batch and tuple(batch[key].shape) != bt:
                raise ValueError(f"batch[{key!r}] must be shaped (B, T) = {bt} like the images, "
                                 f"got {tuple(batch[key].shape)}")
        mask = batch.get("mask")
        mask = torch.ones(bt, dtype=torch.bool, device=images.device) if mask is None else mask.bool()
        weight = mask if "weight" not in batch else mask.to(images.dtype) * batch["weight"].to(images.dtype)
        if self.sensors and "speed" not in batch:
            raise KeyError(f"batch is missing 'speed': this model has the speed input; got keys {sorted(batch)}")
        teacher = self.teacher_inputs(batch) if self.feedback else None
        out, _ = self.outputs(images, None, speed=batch.get("speed"), teacher=teacher,
                              own_probability=own_probability, drop_probability=drop_probability)
        steering_mse = _masked_mse(out["steering"], batch["steering"], weight)
        loss = self.config.steering_weight * steering_mse
        w = mask.to(images.dtype)
        mae = ((out["steering"] - batch["steering"]).abs() * w).sum() / w.sum().clamp(min=1.0)
        metrics = {"steering_mse": steering_mse.item(), "steering_mae": mae.item()}
        targets = {"speed": (batch.get("speed"), self.config.speed_scale, self.config.aux_speed_weight),
                   "throttle": (batch.get("throttle"), 1.0, self.config.aux_throttle_weight)}
        for name in self.aux_heads:
            target, scale, aux_weight = targets[name]
            if target is None:
                continue
            term = _masked_mse(out[name], target / scale, weight)  # speed in units of speed_scale
            loss = loss + aux_weight * term
            metrics[f"{name}_mse"] = term.item()
        metrics["loss"] = loss.item()
        return loss, metrics


class PilotNet(SteeringModel):
    """NVIDIA PilotNet: 5 conv (ELU) + FC 100-50-10-1, tanh steering; every frame independent.
    Inputs beside the image join the flattened conv features before the first FC layer."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.convs, (h, w) = _conv_trunk(3, config.preprocess.resize, PILOTNET_CONVS)
        flat = PILOTNET_CONVS[-1][0] * h * w  # 64 * 1 * 18 = 1152 at 66x200
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout),
            nn.Linear(flat + self.extra_inputs, 100), nn.ELU(), nn.Dropout(config.dropout),
            nn.Linear(100, 50), nn.ELU(),
            nn.Linear(50, 10), nn.ELU(),
            nn.Linear(10, 1))

    def encode(self, images, state):
        b, t = images.shape[:2]
        x = self.convs(images.flatten(0, 1))  # (B*T, 64, h', w')
        x = self.head[1](self.head[0](x))  # flatten, dropout: (B*T, flat)
        return x.reshape(b, t, -1), state

    def core(self, x, state):
        b, t = x.shape[:2]
        steering = torch.tanh(self.head[2:](x.flatten(0, 1))).view(b, t)  # (B, T)
        return {"steering": steering}, state


class FrameEncoder(nn.Module):
    """Per-frame conv features -> adaptive average pool to POOL_GRID -> FC to ``feature_dim``."""

    def __init__(self, in_channels: int, hw: tuple[int, int], specs, feature_dim: int, dropout: float):
        super().__init__()
        self.convs, _ = _conv_trunk(in_channels, hw, specs)
        self.pool = nn.AdaptiveAvgPool2d(POOL_GRID)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(specs[-1][0] * POOL_GRID[0] * POOL_GRID[1], feature_dim),
                                nn.ELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, h, w) -> (N, feature_dim)
        return self.fc(self.pool(self.convs(x)))


class _LSTMModel(SteeringModel):
    recurrent = True

    def _build_lstm(self, config: ModelConfig) -> None:
        self.lstm = nn.LSTM(config.feature_dim + self.extra_inputs, config.hidden, config.lstm_layers,
                            batch_first=True, dropout=config.dropout if config.lstm_layers > 1 else 0.0)

    def _lstm_state(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.lstm_layers, batch_size, self.config.hidden)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def _run_lstm(self, features: torch.Tensor, hc):  # (B, T, F) -> (B, T, hidden)
        if features.shape[1] == 1 and not self.training:  # one closed-loop frame
            return self._lstm_step(features[:, 0], hc)
        hc = tuple(s.contiguous() for s in hc)
        return self.lstm(features, hc)

    def _lstm_step(self, x: torch.Tensor, hc):  # (B, F) -> (B, 1, hidden)
        """One time step of ``self.lstm`` written out (gate order i, f, g, o, as nn.LSTM):
        the closed-loop case, where nn.LSTM's sequence kernel costs ~0.15 ms of set-up per
        call on CPU. Equal to ``self.lstm`` up to float rounding (tested)."""
        h0, c0 = hc  # (layers, B, hidden) each
        hs, cs = [], []
        for layer in range(self.config.lstm_layers):
            gates = (F.linear(x, getattr(self.lstm, f"weight_ih_l{layer}"), getattr(self.lstm, f"bias_ih_l{layer}"))
                     + F.linear(h0[layer], getattr(self.lstm, f"weight_hh_l{layer}"),
                                getattr(self.lstm, f"bias_hh_l{layer}")))  # (B, 4 * hidden)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c0[layer] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)  # h; inter-layer dropout is off outside training
            hs.append(x)
            cs.append(c)
        return x.unsqueeze(1), (torch.stack(hs), torch.stack(cs))


class CNNLSTM(_LSTMModel):
    """Per-frame CNN features -> LSTM -> per-step tanh steering.

    State: (h, c), each (lstm_layers, B, hidden)."""

    state_batch_dims = (1, 1)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.encoder = FrameEncoder(3, config.preprocess.resize, ENCODER_CONVS, config.feature_dim, config.dropout)
        self._build_lstm(config)
        self.steering_head = nn.Linear(config.hidden, 1)

    def initial_core_state(self, batch_size, device=None):
        return self._lstm_state(batch_size, device)

    def encode(self, images, state):
        b, t = images.shape[:2]
        return self.encoder(images.flatten(0, 1)).view(b, t, -1), state  # (B, T, F)

    def core(self, x, state):
        y, hc = self._run_lstm(x, state)  # (B, T, hidden)
        return {"steering": torch.tanh(self.steering_head(y)).squeeze(-1)}, hc


class Chauffeur(CNNLSTM):
    """Chauffeur-style (3rd place, Udacity challenge): features of a per-frame encoder that
    was trained first (on more data, on steering or the privileged lane features; see
    training.encoder) and then frozen, fed into an LSTM over long windows (50 frames).

    The encoder's weights are part of the checkpoint; in training they get no gradient and
    its dropout stays off. State: (h, c) as CNN+LSTM."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout
        return self


class Conv3DLSTM(_LSTMModel):
    """Komanda-style: a 3D convolution whose temporal extent covers ``frame_stack`` frames,
    sliding causally (output t sees frames t-frame_stack+1..t), spatial convs, LSTM, and
    heads for steering (tanh), speed and throttle (auxiliary losses).

    Padding at episode start: the missing past frames are copies of the episode's first
    frame (as if the car had been looking at that scene before), never zeros.
    State: (h, c, frames, filled): h, c (lstm_layers, B, hidden); frames (B, frame_stack-1,
    3, h, w), the last frames seen; filled (B,), 0 until the first frame of the episode
    arrives (then ``frames`` is replaced by copies of it), 1 after. ``predict_sequence``
    with ``state=None`` pads the window identically, so stepping equals the window pass."""

    state_batch_dims = (1, 1, 0, 0)
    aux_heads = ("speed", "throttle")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        k = config.frame_stack
        (pad_h, h), (pad_w, w) = (_conv_geometry(s, 5, 2) for s in config.preprocess.resize)
        self.conv3d = nn.Conv3d(3, 24, kernel_size=(k, 5, 5), stride=(1, 2, 2), padding=(0, pad_h, pad_w))
        self.encoder = FrameEncoder(24, (h, w), ENCODER_CONVS[1:], config.feature_dim, config.dropout)
        self._build_recurrent(config)

    def _build_recurrent(self, config: ModelConfig) -> None:
        self._build_lstm(config)
        self.heads = nn.Linear(config.hidden, 3)  # steering, speed, throttle

    def _frame_state(self, batch_size, device):
        frames = torch.zeros(batch_size, self.config.frame_stack - 1, *self.input_shape, device=device)
        return frames, torch.zeros(batch_size, device=device)

    def initial_core_state(self, batch_size, device=None):
        return (*self._lstm_state(batch_size, device), *self._frame_state(batch_size, device))

    def encode(self, images, state):
        """The 3D conv over the window and the last frame_stack-1 frames before it (state[-2:])."""
        b, t = images.shape[:2]
        k = self.config.frame_stack
        frames, filled = state[-2:]
        first = images[:, :1].expand(b, k - 1, *self.input_shape)  # (B, K-1, 3, h, w)
        past = torch.where(filled.view(b, 1, 1, 1, 1) > 0, frames, first)  # (B, K-1, 3, h, w)
        seq = torch.cat([past, images], dim=1)  # (B, T+K-1, 3, h, w)
        x = F.elu(self.conv3d(seq.transpose(1, 2)))  # (B, 24, T, h', w')
        x = x.transpose(1, 2).flatten(0, 1)  # (B*T, 24, h', w')
        features = self.encoder(x).view(b, t, -1)  # (B, T, F)
        new_frames = seq[:, seq.shape[1] - (k - 1):]  # (B, K-1, 3, h, w)
        return features, (*state[:-2], new_frames, torch.ones_like(filled))

    def _heads(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.heads(y)  # (B, T, 3)
        return {"steering": torch.tanh(out[..., 0]), "speed": out[..., 1], "throttle": out[..., 2]}

    def core(self, x, state):
        y, (h, c) = self._run_lstm(x, state[:2])  # (B, T, hidden)
        return self._heads(y), (h, c, *state[2:])


class Komanda(Conv3DLSTM):
    """Komanda (1st place, Udacity challenge) in this testbed's terms: the causal 3D
    convolution over the last ``frame_stack`` frames, then a stateful LSTM and a simple
    (Elman, tanh) RNN layer, heads for steering, speed and throttle; all three outputs of
    step t-1 are inputs at step t (logged values in teacher-forced training, its own
    predictions in closed loop). Windows of 10 frames by default.

    State: (h, c, r, frames, filled, previous outputs): r (1, B, hidden) is the simple RNN's."""

    state_batch_dims = (1, 1, 1, 0, 0)

    def _build_recurrent(self, config: ModelConfig) -> None:
        self._build_lstm(config)
        self.rnn = nn.RNN(config.hidden, config.hidden, batch_first=True, nonlinearity="tanh")
        self.heads = nn.Linear(config.hidden, 3)  # steering, speed, throttle

    def initial_core_state(self, batch_size, device=None):
        h, c = self._lstm_state(batch_size, device)
        r = torch.zeros(1, batch_size, self.config.hidden, device=device)
        return (h, c, r, *self._frame_state(batch_size, device))

    def _run_rnn(self, y: torch.Tensor, r: torch.Tensor):  # (B, T, hidden) -> (B, T, hidden), (1, B, hidden)
        if y.shape[1] == 1 and not self.training:  # one closed-loop frame, written out as _lstm_step
            z = torch.tanh(F.linear(y[:, 0], self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)
                           + F.linear(r[0], self.rnn.weight_hh_l0, self.rnn.bias_hh_l0))  # (B, hidden)
            return z.unsqueeze(1), z.unsqueeze(0)
        return self.rnn(y, r.contiguous())

    def core(self, x, state):
        y, (h, c) = self._run_lstm(x, state[:2])  # (B, T, hidden)
        z, r = self._run_rnn(y, state[2])
        return self._heads(z), (h, c, r, *state[3:])


MODELS = {"pilotnet": PilotNet, "cnn-lstm": CNNLSTM, "conv3d-lstm": Conv3DLSTM, "komanda": Komanda,
          "chauffeur": Chauffeur}


def build_model(config: ModelConfig) -> SteeringModel:
    """A freshly initialised model for ``config`` (seed torch beforehand for reproducibility)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(config).__name__}; "
                        f"use ModelConfig.from_dict for a dict")
    return MODELS[config.arch](config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
