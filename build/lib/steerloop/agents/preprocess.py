"""Camera-frame preprocessing shared by training and driving.

Training (on logged frames) and closed-loop driving (on live frames) both call exactly
:func:`preprocess`, so a model never sees differently prepared pixels in the two settings.
The pipeline follows NVIDIA PilotNet: crop the sky, resize to the network input, convert
to YUV, normalise to [-1, 1] (x / 127.5 - 1), channels first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from steerloop.errors import check_keys

COLOUR_SPACES = ("yuv", "rgb")
MIN_ROWS = 8  # [px] rows that must remain after cropping
MIN_SIZE = 8  # [px] smallest network input height/width


@dataclass
class PreprocessConfig:
    """How a raw uint8 RGB camera frame becomes a float32 network input."""

    crop_top: int = 20
    """Pixel rows removed from the top of the raw frame (the sky; 20 of PilotNet's 66 rows)."""
    crop_bottom: int = 0
    """Pixel rows removed from the bottom of the raw frame (e.g. the car's bonnet)."""
    resize: tuple[int, int] = (66, 200)
    """(height, width) [px] of the network input after cropping; PilotNet resizes back to 66x200."""
    colour_space: str = "yuv"
    """Colour space of the network input: "yuv" (PilotNet, cv2.COLOR_RGB2YUV) or "rgb"."""

    def __post_init__(self):
        for name in ("crop_top", "crop_bottom"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"PreprocessConfig.{name} must be an integer >= 0 (pixel rows), got {value!r}")
        try:
            height, width = (int(v) for v in self.resize)
        except (TypeError, ValueError):
            raise ValueError(f"PreprocessConfig.resize must be (height, width) in pixels, got {self.resize!r}") from None
        if height < MIN_SIZE or width < MIN_SIZE:
            raise ValueError(f"PreprocessConfig.resize must be at least ({MIN_SIZE}, {MIN_SIZE}) pixels, "
                             f"got {(height, width)}")
        self.resize = (height, width)
        if self.colour_space not in COLOUR_SPACES:
            raise ValueError(f"PreprocessConfig.colour_space must be one of {COLOUR_SPACES}, got {self.colour_space!r}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one preprocessed frame."""
        return (3, *self.resize)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize"] = list(self.resize)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        if not isinstance(d, dict):
            raise ValueError(f"preprocess config must be a dict, got {type(d).__name__}")
        check_keys(d, [f.name for f in fields(cls)], "preprocess config")
        d = dict(d)
        if "resize" in d and isinstance(d["resize"], list):
            d["resize"] = tuple(d["resize"])
        return cls(**d)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Shorthand for ``preprocess(images, self)``."""
        return preprocess(images, self)


def preprocess(images: np.ndarray, config: PreprocessConfig | None = None) -> np.ndarray:
    """uint8 RGB frames (..., H, W, 3) -> float32 network inputs (..., 3, h, w) in [-1, 1].

    Vectorised over any leading dims (a single frame, a batch (N, ...), windows (B, T, ...)).
    """
    x = preprocess_channels_last(images, config)  # (..., h, w, 3)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))  # (..., 3, h, w)


def preprocess_channels_last(images: np.ndarray, config: PreprocessConfig | None = None) -> np.ndarray:
    """:func:`preprocess` before the channel axis moves: float32 (..., h, w, 3), the same
    values. ``torch.from_numpy(x).permute(0, 3, 1, 2)`` of a batch is then a channels-last
    (N, 3, h, w) tensor with no copy, which CPU convolutions run fastest on."""
    config = config or PreprocessConfig()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"preprocess expects uint8 RGB frames (..., H, W, 3), got dtype {images.dtype} "
                        f"with shape {images.shape}; pass the camera image as rendered (0..255)")
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"preprocess expects RGB frames shaped (..., H, W, 3), got shape {images.shape}")
    raw_h, raw_w = images.shape[-3:-1]
    rows = raw_h - config.crop_top - config.crop_bottom
    if rows < MIN_ROWS:
        raise ValueError(f"cropping {config.crop_top} rows from the top and {config.crop_bottom} from the bottom "
                         f"of frames shaped {images.shape} leaves {rows} rows (need >= {MIN_ROWS}); "
                         f"reduce crop_top/crop_bottom or render taller frames")
    height, width = config.resize
    lead = images.shape[:-3]
    flat = images.reshape(-1, raw_h, raw_w, 3)  # (N, H, W, 3)
    out = np.empty((flat.shape[0], height, width, 3), dtype=np.uint8)  # (N, h, w, 3)
    same_size = (rows, raw_w) == (height, width)
    for i, frame in enumerate(flat):
        frame = frame[config.crop_top:raw_h - config.crop_bottom]  # (rows, W, 3)
        if same_size:
            out[i] = frame
        else:
            cv2.resize(np.ascontiguousarray(frame), (width, height), dst=out[i], interpolation=cv2.INTER_AREA)
    if config.colour_space == "yuv" and len(out):  # per pixel, so the whole batch at once: (N*h, w, 3)
        cv2.cvtColor(out.reshape(-1, width, 3), cv2.COLOR_RGB2YUV, dst=out.reshape(-1, width, 3))
    x = out.astype(np.float32)  # (N, h, w, 3); then x / 127.5 - 1 in float32, in place
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return x.reshape(*lead, height, width, 3)
