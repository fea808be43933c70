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
from dataclasses import dataclass

import cv2
import numpy as np

from steerloop.sim.camera import FAR_PLANE, NEAR_PLANE, PITCH_RANGE_DEG, CameraSpec
from steerloop.sim.conditions import CameraLook, Weather

RAIN_LENGTH = (0.06, 0.16)  # [fraction of the image height] streak lengths
RAIN_SLANT = 0.25  # [-] horizontal drift per unit of streak length
RAIN_BRIGHTNESS = 0.35  # [-] how far a streak pulls a pixel towards RAIN_COLOUR
RAIN_COLOUR = 215.0  # [8-bit level]
GLARE_RADIUS = 0.35  # [fraction of the image width] Gaussian sigma of the sun glare


@dataclass
class Effects:
    """The effects of one episode (drawn once at reset) and the generator of per-frame noise."""

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

    @property
    def needs_depth(self) -> bool:
        return self.fog > 0.0


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
    """The (H, W, 3) uint8 frame as this episode's camera records it."""
    if effects is None:
        return frame
    image = frame.astype(np.float32)
    height, width = image.shape[:2]
    if effects.fog > 0.0 and depth_buffer is not None:
        keep = np.exp(-effects.fog * linear_depth(depth_buffer.astype(np.float32)))[..., None]
        image = image * keep + effects.fog_colour * (1.0 - keep)
    gx, gy, peak = effects.glare
    if peak > 0.0:
        y, x = np.ogrid[:height, :width]
        r2 = ((x - gx * width) ** 2 + (y - gy * height) ** 2) / (GLARE_RADIUS * width) ** 2
        image = image + (255.0 * peak) * np.exp(-0.5 * r2, dtype=np.float32)[..., None]
    if effects.gain != 1.0:
        image = image * np.float32(effects.gain)
    if effects.rain:
        image = _rain(image, effects)
    if effects.blur > 0.0:
        image = cv2.GaussianBlur(image, (0, 0), effects.blur)
    if effects.noise > 0.0:
        image = image + effects.rng.standard_normal(image.shape, dtype=np.float32) * np.float32(effects.noise)
    out = np.clip(image, 0.0, 255.0).astype(np.uint8)
    if effects.jpeg:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, effects.jpeg])
        out = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(out)


def _rain(image: np.ndarray, effects: Effects) -> np.ndarray:
    """Bright slanted streaks at new random places every frame."""
    height, width = image.shape[:2]
    rng = effects.rng
    x0 = rng.uniform(0, width, effects.rain)
    y0 = rng.uniform(0, height, effects.rain)
    length = rng.uniform(*RAIN_LENGTH, effects.rain) * height
    mask = np.zeros((height, width), np.uint8)
    for x, y, n in zip(x0, y0, length):
        cv2.line(mask, (int(x), int(y)), (int(x + RAIN_SLANT * n), int(y + n)), 255, 1)
    weight = (mask.astype(np.float32) * (RAIN_BRIGHTNESS / 255.0))[..., None]
    return image * (1.0 - weight) + RAIN_COLOUR * weight
