"""Learned steering models: PilotNet, CNN+LSTM (Chauffeur-style), Conv3D+LSTM (Komanda-style).

Every model shares one interface, so the trainer, the policy wrapper and the checkpoint
code are generic across architectures:

- ``forward(batch) -> (loss, metrics)`` on a batch of windows (B, T, 3, h, w);
- ``predict_sequence(images, state=None) -> (steering (B, T), state)``, the window pass;
- ``step(image, state) -> (steering (B,), state)``, one frame per call in closed loop,
  O(1) per step: recurrent state carries everything the model remembers;
- ``initial_state(batch_size)``: the episode-start state (``None`` for PilotNet).

``step`` is ``predict_sequence`` on a window of length 1, so stepping frame by frame from
``initial_state`` gives the same outputs as the window pass (up to float rounding).

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

ARCHS = ("pilotnet", "cnn-lstm", "conv3d-lstm")


@dataclass
class ModelConfig:
    """Architecture and preprocessing of a learned steering model (stored in config.json)."""

    arch: str = "pilotnet"
    """One of "pilotnet" (single frame), "cnn-lstm" (per-frame CNN + LSTM), "conv3d-lstm" (3D conv + LSTM)."""
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
        return self.arch != "pilotnet"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["preprocess"] = self.preprocess.to_dict()
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
        return cls(**d)


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


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries where ``mask`` is true (0 if none)."""
    w = mask.to(pred.dtype)
    return ((pred - target) ** 2 * w).sum() / w.sum().clamp(min=1.0)


class SteeringModel(nn.Module):
    """Shared interface; subclasses implement ``outputs(images (B, T, 3, h, w), state)``."""

    recurrent: bool = False
    state_batch_dims: tuple[int, ...] = ()
    """Batch axis of each state tensor (how the policy resets single environments)."""
    aux_heads: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.input_shape = config.preprocess.output_shape  # (3, h, w)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None):
        """Episode-start state for ``batch_size`` environments; ``None`` for stateless models."""
        return None

    def outputs(self, images: torch.Tensor, state) -> tuple[dict[str, torch.Tensor], object]:
        raise NotImplementedError

    def _check_images(self, images: torch.Tensor, ndim: int, what: str) -> None:
        shape = "(B, T, 3, h, w)" if ndim == 5 else "(B, 3, h, w)"
        if not isinstance(images, torch.Tensor) or images.ndim != ndim or tuple(images.shape[-3:]) != self.input_shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{what} expects preprocessed images shaped {shape} with (3, h, w) = "
                             f"{self.input_shape} (from ModelConfig.preprocess.resize), got {got}; "
                             f"run agents.preprocess.preprocess with the model's PreprocessConfig")

    def predict_sequence(self, images: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
        """Window pass: images (B, T, 3, h, w) -> steering (B, T) in [-1, 1], final state."""
        self._check_images(images, 5, "predict_sequence")
        out, state = self.outputs(images, state)
        return out["steering"], state

    def step(self, image: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """One closed-loop frame: image (B, 3, h, w) -> steering (B,), next state. O(1)."""
        self._check_images(image, 4, "step")
        out, state = self.outputs(image.unsqueeze(1), state)  # (B, 1, 3, h, w)
        return out["steering"][:, 0], state

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training/validation loss on a batch of windows; metrics are python floats."""
        for key in ("images", "steering"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r}: forward needs 'images' (B, T, 3, h, w) and "
                               f"'steering' (B, T); got keys {sorted(batch)}")
        images = batch["images"]
        self._check_images(images, 5, "forward")
        bt = tuple(images.shape[:2])
        for key in ("steering", "speed", "throttle", "mask"):
            if key in batch and tuple(batch[key].shape) != bt:
                raise ValueError(f"batch[{key!r}] must be shaped (B, T) = {bt} like the images, "
                                 f"got {tuple(batch[key].shape)}")
        mask = batch.get("mask")
        mask = torch.ones(bt, dtype=torch.bool, device=images.device) if mask is None else mask.bool()
        out, _ = self.outputs(images, None)
        steering_mse = _masked_mse(out["steering"], batch["steering"], mask)
        loss = self.config.steering_weight * steering_mse
        w = mask.to(images.dtype)
        mae = ((out["steering"] - batch["steering"]).abs() * w).sum() / w.sum().clamp(min=1.0)
        metrics = {"steering_mse": steering_mse.item(), "steering_mae": mae.item()}
        targets = {"speed": (batch.get("speed"), self.config.speed_scale, self.config.aux_speed_weight),
                   "throttle": (batch.get("throttle"), 1.0, self.config.aux_throttle_weight)}
        for name in self.aux_heads:
            target, scale, weight = targets[name]
            if target is None:
                continue
            term = _masked_mse(out[name], target / scale, mask)  # speed in units of speed_scale
            loss = loss + weight * term
            metrics[f"{name}_mse"] = term.item()
        metrics["loss"] = loss.item()
        return loss, metrics


class PilotNet(SteeringModel):
    """NVIDIA PilotNet: 5 conv (ELU) + FC 100-50-10-1, tanh steering; every frame independent."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.convs, (h, w) = _conv_trunk(3, config.preprocess.resize, PILOTNET_CONVS)
        flat = PILOTNET_CONVS[-1][0] * h * w  # 64 * 1 * 18 = 1152 at 66x200
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout),
            nn.Linear(flat, 100), nn.ELU(), nn.Dropout(config.dropout),
            nn.Linear(100, 50), nn.ELU(),
            nn.Linear(50, 10), nn.ELU(),
            nn.Linear(10, 1))

    def outputs(self, images, state):
        b, t = images.shape[:2]
        x = self.convs(images.flatten(0, 1))  # (B*T, 64, h', w')
        steering = torch.tanh(self.head(x)).view(b, t)  # (B, T)
        return {"steering": steering}, None


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
        self.lstm = nn.LSTM(config.feature_dim, config.hidden, config.lstm_layers, batch_first=True,
                            dropout=config.dropout if config.lstm_layers > 1 else 0.0)

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
    """Chauffeur-style: per-frame CNN features -> LSTM -> per-step tanh steering.

    State: (h, c), each (lstm_layers, B, hidden)."""

    state_batch_dims = (1, 1)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.encoder = FrameEncoder(3, config.preprocess.resize, ENCODER_CONVS, config.feature_dim, config.dropout)
        self._build_lstm(config)
        self.steering_head = nn.Linear(config.hidden, 1)

    def initial_state(self, batch_size, device=None):
        return self._lstm_state(batch_size, device)

    def outputs(self, images, state):
        b, t = images.shape[:2]
        if state is None:
            state = self.initial_state(b, images.device)
        features = self.encoder(images.flatten(0, 1)).view(b, t, -1)  # (B, T, F)
        y, hc = self._run_lstm(features, state)  # (B, T, hidden)
        return {"steering": torch.tanh(self.steering_head(y)).squeeze(-1)}, hc


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
        self._build_lstm(config)
        self.heads = nn.Linear(config.hidden, 3)  # steering, speed, throttle

    def initial_state(self, batch_size, device=None):
        h, c = self._lstm_state(batch_size, device)
        frames = torch.zeros(batch_size, self.config.frame_stack - 1, *self.input_shape, device=device)
        return h, c, frames, torch.zeros(batch_size, device=device)

    def outputs(self, images, state):
        b, t = images.shape[:2]
        k = self.config.frame_stack
        if state is None:
            state = self.initial_state(b, images.device)
        h, c, frames, filled = state
        first = images[:, :1].expand(b, k - 1, *self.input_shape)  # (B, K-1, 3, h, w)
        past = torch.where(filled.view(b, 1, 1, 1, 1) > 0, frames, first)  # (B, K-1, 3, h, w)
        seq = torch.cat([past, images], dim=1)  # (B, T+K-1, 3, h, w)
        x = F.elu(self.conv3d(seq.transpose(1, 2)))  # (B, 24, T, h', w')
        x = x.transpose(1, 2).flatten(0, 1)  # (B*T, 24, h', w')
        features = self.encoder(x).view(b, t, -1)  # (B, T, F)
        y, (h, c) = self._run_lstm(features, (h, c))  # (B, T, hidden)
        out = self.heads(y)  # (B, T, 3)
        outputs = {"steering": torch.tanh(out[..., 0]), "speed": out[..., 1], "throttle": out[..., 2]}
        new_frames = seq[:, seq.shape[1] - (k - 1):]  # (B, K-1, 3, h, w)
        return outputs, (h, c, new_frames, torch.ones_like(filled))


MODELS = {"pilotnet": PilotNet, "cnn-lstm": CNNLSTM, "conv3d-lstm": Conv3DLSTM}


def build_model(config: ModelConfig) -> SteeringModel:
    """A freshly initialised model for ``config`` (seed torch beforehand for reproducibility)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(config).__name__}; "
                        f"use ModelConfig.from_dict for a dict")
    return MODELS[config.arch](config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
