"""Weather and camera as image formation, applied to each rendered frame inside the simulator.

In the order light takes: haze/fog from the depth buffer, sun glare, scene brightness and
exposure, rain streaks on the lens, blur, sensor noise, JPEG compression. Everything random
is drawn per episode from the environment's ``np_random`` (:func:`draw_effects`), and per
frame from a generator seeded by it, so frames are bit-identical per seed and a copy of the
environment continues identically. A condition with no effect draws nothing: today's
conditions keep their random streams and their pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np

from steerloop.sim.camera import FAR_PLANE, NEAR_PLANE, PITCH_RANGE_DEG, CameraSpec
from steerloop.sim.conditions import CameraLook, Weather

RAIN_LENGTH = (0.06, 0.16)  # [fraction of the image height] streak lengths
RAIN_SLANT = 0.25  # [-] horizontal drift per unit of streak length
RAIN_BRIGHTNESS = 0.35  # [-] how far a streak pulls a pixel towards RAIN_COLOUR
RAIN_COLOUR = 215.0  # [8-bit level]
GLARE_RADIUS = 0.35  # [fraction of the image width] Gaussian sigma of the sun glare
# a streak pixel becomes pixel * _RAIN_KEEP + _RAIN_ADD: its float32 weight (8-bit mask level 255 times
# RAIN_BRIGHTNESS / 255) and both factors computed with the float32 operations of a whole-image blend
_RAIN_WEIGHT = np.float32([255.0]) * (RAIN_BRIGHTNESS / 255.0)
_RAIN_KEEP = (1.0 - _RAIN_WEIGHT)[0]  # [-]
_RAIN_ADD = (RAIN_COLOUR * _RAIN_WEIGHT)[0]  # [8-bit level]
JPEG_READ = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # our own JPEG has no EXIF: skip looking for it


class FrameConstants(NamedTuple):
    """What every frame of an episode at one image shape adds or blends, computed once."""

    glare: np.ndarray | None  # (H, W, 3) float32 [8-bit levels], None without glare
    fog_colour: np.ndarray  # (H, W, 3) float32 [8-bit levels]


@dataclass
class Effects:
    """The effects of one episode (drawn once at reset, then never changed) and the generator of
    per-frame noise."""

    fog: float
    fog_colour: np.ndarray  # (3,) float32 [8-bit levels]
    gain: float  # [-] scene brightness x exposure
    rain: int
    glare: tuple[float, float, float]  # (x, y) [fraction of width/height], peak [0-1]
    noise: float  # [8-bit levels]
    blur: float  # [px]
    jpeg: int
    mount: tuple[float, float, float]  # pitch [deg], yaw [deg], height [m] errors
    rng: np.random.Generator
    _constants: dict[tuple[int, ...], FrameConstants] = field(default_factory=dict, init=False, repr=False,
                                                              compare=False)
    """FrameConstants per (H, W, 3) shape, made on first use (not copied or pickled)."""

    @property
    def needs_depth(self) -> bool:
        return self.fog > 0.0

    def constants(self, shape: tuple[int, int, int]) -> FrameConstants:
        """This episode's glare and fog colour laid out over (H, W, 3) frames (cached per shape)."""
        if shape not in self._constants:
            height, width = shape[:2]
            fog_colour = np.ascontiguousarray(np.broadcast_to(self.fog_colour, shape))
            self._constants[shape] = FrameConstants(_glare(height, width, self.glare), fog_colour)
        return self._constants[shape]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cached constants behind (they are remade on first use)."""
        return {**self.__dict__, "_constants": {}}


def draw_effects(weather: Weather, camera: CameraLook, np_random: np.random.Generator) -> Effects | None:
    """This episode's effects of ``weather`` and ``camera``, or None (and no draw) when there are none."""
    plain = dataclasses.replace(weather, sky=Weather.sky, light=Weather.light, surfaces={}, split="train")
    if plain == Weather() and camera.is_ideal:
        return None
    seed = int(np_random.integers(2**63))
    exposure = float(np_random.uniform(-camera.exposure, camera.exposure))
    mount = tuple(float(np_random.uniform(-bound, bound))
                  for bound in (camera.mount_pitch_deg, camera.mount_yaw_deg, camera.mount_height))
    glare = (float(np_random.uniform(0.2, 0.8)), float(np_random.uniform(0.0, 0.3)), weather.glare)
    return Effects(fog=weather.fog, fog_colour=np.asarray(weather.fog_colour, np.float32) * 255.0,
                   gain=weather.gain * 2.0 ** exposure, rain=weather.rain, glare=glare,
                   noise=camera.noise / max(weather.gain, 0.1), blur=camera.blur, jpeg=camera.jpeg, mount=mount,
                   rng=np.random.default_rng(seed))


def mounted(spec: CameraSpec, effects: Effects | None) -> CameraSpec:
    """``spec`` with this episode's mounting error (pitch kept within the supported range)."""
    if effects is None or effects.mount == (0.0, 0.0, 0.0):
        return spec
    pitch, yaw, height = effects.mount
    low, high = PITCH_RANGE_DEG
    return dataclasses.replace(spec, pitch_deg=min(max(spec.pitch_deg + pitch, low), high),
                               yaw_deg=spec.yaw_deg + yaw, mount_height=spec.mount_height + height)


def linear_depth(depth_buffer: np.ndarray) -> np.ndarray:
    """Distances [m] along the optical axis from the renderer's [0, 1] depth buffer."""
    return FAR_PLANE * NEAR_PLANE / (FAR_PLANE - (FAR_PLANE - NEAR_PLANE) * depth_buffer)


def apply(frame: np.ndarray, depth_buffer: np.ndarray | None, effects: Effects | None) -> np.ndarray:
    """The (H, W, 3) uint8 frame as this episode's camera records it.

    Every step is float32 arithmetic done in place on one (H, W, 3) image, with per-pixel factors
    expanded to three channels (a (H, W, 1) operand makes numpy loop three values at a time) and
    per-episode constants (glare, fog colour) computed once per shape: the same operations, so
    the same bits, as composing the effects with fresh temporaries (tests/sim/test_imaging.py).
    """
    if effects is None:
        return frame
    out = _to_uint8(_sensor_image(frame, depth_buffer, effects))
    return _jpeg_round_trip(out, effects.jpeg) if effects.jpeg else out


def _sensor_image(frame: np.ndarray, depth_buffer: np.ndarray | None, effects: Effects) -> np.ndarray:
    """The (H, W, 3) float32 image [8-bit levels] on the sensor: light, lens and noise, before quantisation."""
    image = frame.astype(np.float32, order="C")  # C order: _rain writes through a reshaped view
    constants = effects.constants(image.shape)
    if effects.fog > 0.0 and depth_buffer is not None:
        _fog(image, depth_buffer, effects.fog, constants.fog_colour)
    if constants.glare is not None:
        image += constants.glare
    if effects.gain != 1.0:
        image *= np.float32(effects.gain)
    if effects.rain:
        _rain(image, effects)
    spare = None  # a free (H, W, 3) float32 buffer for the noise once the blur has made a new image
    if effects.blur > 0.0:
        image, spare = cv2.GaussianBlur(image, (0, 0), effects.blur), image
    if effects.noise > 0.0:
        noise = effects.rng.standard_normal(image.shape, dtype=np.float32, out=spare)
        noise *= np.float32(effects.noise)
        image += noise
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """``image`` clipped to [0, 255] (in place) and truncated to uint8."""
    return np.clip(image, 0.0, 255.0, out=image).astype(np.uint8)


def _jpeg_round_trip(frame: np.ndarray, quality: int) -> np.ndarray:
    """The RGB ``frame`` after JPEG compression at ``quality`` (1-100) and decompression."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(data, JPEG_READ), cv2.COLOR_BGR2RGB)


def _three(plane: np.ndarray) -> np.ndarray:
    """A (H, W) float32 plane repeated into a contiguous (H, W, 3) image (an exact copy)."""
    return cv2.merge((plane, plane, plane))


def _fog(image: np.ndarray, depth_buffer: np.ndarray, fog: float, fog_colour: np.ndarray) -> None:
    """Fade ``image`` in place towards the fog colour: image * keep + colour * (1 - keep)."""
    keep = np.exp(-fog * linear_depth(np.asarray(depth_buffer, np.float32)))
    keep3 = _three(keep)
    image *= keep3
    np.subtract(1.0, keep3, out=keep3)
    keep3 *= fog_colour
    image += keep3


def _glare(height: int, width: int, glare: tuple[float, float, float]) -> np.ndarray | None:
    """The (H, W, 3) float32 sun glare added to every frame of the episode [8-bit levels], or None."""
    gx, gy, peak = glare
    if not peak > 0.0:
        return None
    y, x = np.ogrid[:height, :width]
    r2 = ((x - gx * width) ** 2 + (y - gy * height) ** 2) / (GLARE_RADIUS * width) ** 2
    return _three((255.0 * peak) * np.exp(-0.5 * r2, dtype=np.float32))


def _rain(image: np.ndarray, effects: Effects) -> None:
    """Bright slanted streaks at new random places every frame, drawn in place."""
    height, width = image.shape[:2]
    rng = effects.rng
    x0 = rng.uniform(0, width, effects.rain)
    y0 = rng.uniform(0, height, effects.rain)
    length = rng.uniform(*RAIN_LENGTH, effects.rain) * height
    ends = np.stack([x0, y0, x0 + RAIN_SLANT * length, y0 + length], axis=1).astype(np.int32)  # truncated, as int()
    mask = np.zeros((height, width), np.uint8)
    cv2.polylines(mask, list(ends.reshape(-1, 2, 2)), False, 1, 1)  # each streak as its own cv2.line would
    pixels = image.reshape(-1, 3)  # a view of the image
    streak = np.flatnonzero(mask.view(bool))  # the mask holds 0 and 1 only, so it is a valid bool array
    pixels[streak] = pixels[streak] * _RAIN_KEEP + _RAIN_ADD
