"""Image formation (sim/imaging.py) made cheap without changing a bit: the in-place, cached
``apply`` against a verbatim copy of the implementation it replaced, on random frames and depth
buffers, for every built-in weather x camera with effects, several seeds and image shapes."""

from __future__ import annotations

import copy
import pickle
import tracemalloc

import cv2
import numpy as np
import pytest

from steerloop.sim import conditions, imaging
from steerloop.sim.camera import FAR_PLANE, NEAR_PLANE
from steerloop.sim.conditions import CameraLook, Weather
from steerloop.sim.imaging import GLARE_RADIUS, RAIN_BRIGHTNESS, RAIN_COLOUR, RAIN_LENGTH, RAIN_SLANT

# ---- the reference: sim/imaging.py's apply and _rain before the speed-up (commit 3039987), verbatim ----

def linear_depth(depth_buffer: np.ndarray) -> np.ndarray:
    return FAR_PLANE * NEAR_PLANE / (FAR_PLANE - (FAR_PLANE - NEAR_PLANE) * depth_buffer)


def reference_apply(frame: np.ndarray, depth_buffer: np.ndarray | None, effects) -> np.ndarray:
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
        image = reference_rain(image, effects)
    if effects.blur > 0.0:
        image = cv2.GaussianBlur(image, (0, 0), effects.blur)
    if effects.noise > 0.0:
        image = image + effects.rng.standard_normal(image.shape, dtype=np.float32) * np.float32(effects.noise)
    out = np.clip(image, 0.0, 255.0).astype(np.uint8)
    if effects.jpeg:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, effects.jpeg])
        out = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(out)


def reference_rain(image: np.ndarray, effects) -> np.ndarray:
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
# ---- end of the reference ----

# every effect at once, stronger than any built-in value (user condition files may set these)
EVERYTHING = (Weather(fog=0.05, fog_colour=(0.9, 0.1, 0.5), rain=120, gain=1.7, glare=0.9),
              CameraLook(exposure=1.0, noise=12.0, blur=1.5, jpeg=15, mount_pitch_deg=2.0))
BUILT_IN = [(weather, camera) for weather in conditions.WEATHER for camera in conditions.CAMERAS
            if imaging.draw_effects(conditions.WEATHER[weather], conditions.CAMERAS[camera],
                                    np.random.default_rng(0)) is not None]
SHAPES = [(66, 200), (16, 32), (33, 47)]  # [px] PilotNet's, the tests' TINY, odd sizes
FRAMES = 3  # consecutive frames per episode: the per-episode constants are reused, the rng runs on


def _inputs(rng: np.random.Generator, shape: tuple[int, int]):
    """A random frame with saturated corners and a depth buffer spanning the near plane to the far plane."""
    frame = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    frame[:2, :2] = 0
    frame[-2:, -2:] = 255
    depth = (1.0 - 10.0 ** rng.uniform(-7.0, 0.0, shape)).astype(np.float32)
    depth[0, :3] = (0.0, 1.0, 0.5)
    return frame, depth


def _check_identical(weather: Weather, camera: CameraLook, seed: int, shape: tuple[int, int]) -> None:
    """New and reference apply give the same bytes and leave the per-frame generator in the same state."""
    new, old = (imaging.draw_effects(weather, camera, np.random.default_rng(seed)) for _ in range(2))
    inputs = np.random.default_rng(seed + 1000)
    for _ in range(FRAMES):
        frame, depth = _inputs(inputs, shape)
        pristine = frame.copy(), depth.copy()
        got, want = imaging.apply(frame, depth, new), reference_apply(frame, depth, old)
        assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape and got.flags.c_contiguous
        assert got.tobytes() == want.tobytes(), (weather, camera, seed, shape)
        assert new.rng.bit_generator.state == old.rng.bit_generator.state
        assert np.array_equal(frame, pristine[0]) and np.array_equal(depth, pristine[1])  # inputs untouched
    # without a depth buffer (fog then skipped), as in the reference
    frame, _ = _inputs(inputs, shape)
    assert imaging.apply(frame, None, new).tobytes() == reference_apply(frame, None, old).tobytes()


@pytest.mark.parametrize("weather,camera", BUILT_IN)
def test_apply_is_bit_identical_to_the_reference_for_every_built_in_effect(weather, camera):
    for seed in (0, 1, 7):
        for shape in SHAPES:
            _check_identical(conditions.WEATHER[weather], conditions.CAMERAS[camera], seed, shape)


def test_apply_is_bit_identical_with_every_effect_at_once():
    for seed in range(4):
        for shape in SHAPES:
            _check_identical(*EVERYTHING, seed, shape)


def test_every_named_effect_condition_is_covered():
    named = {(c.weather, c.camera) for c in conditions.CONDITIONS.values()}
    with_effects = {pair for pair in named if pair in BUILT_IN}
    assert {("rain", "dashcam"), ("low_sun", "cheap"), ("night", "cheap"), ("fog", "dashcam")} <= with_effects
    assert len(BUILT_IN) >= 20  # every weather x camera pair but the plain ones


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_frames_in_any_memory_layout_give_the_reference_bytes(layout):
    """A Fortran-ordered frame or a strided view of an RGBA buffer (as the renderer returns it)."""
    frame, depth = _inputs(np.random.default_rng(5), (33, 47))
    if layout == "fortran":
        frame, depth = np.asfortranarray(frame), np.asfortranarray(depth)
    else:
        rgba = np.concatenate([frame, np.full((33, 47, 1), 255, np.uint8)], axis=2)
        frame = rgba[:, :, :3]
    new, old = (imaging.draw_effects(*EVERYTHING, np.random.default_rng(2)) for _ in range(2))
    assert imaging.apply(frame, depth, new).tobytes() == reference_apply(frame, depth, old).tobytes()


def test_rain_streaks_are_the_reference_lines():
    """One polylines call draws each streak exactly as its own cv2.line did (ends truncated as int())."""
    weather = Weather(rain=400)
    new, old = (imaging.draw_effects(weather, CameraLook(), np.random.default_rng(3)) for _ in range(2))
    frame = np.zeros((66, 200, 3), np.uint8)
    got, want = imaging.apply(frame, None, new), reference_apply(frame, None, old)
    assert (want > 0).sum() > 1000  # many streak pixels, compared exactly
    assert got.tobytes() == want.tobytes()


def test_per_episode_constants_are_cached_but_not_copied_or_pickled():
    effects = imaging.draw_effects(*EVERYTHING, np.random.default_rng(0))
    frame, depth = _inputs(np.random.default_rng(1), (16, 32))
    first = imaging.apply(frame, depth, effects)
    constants = effects.constants(first.shape)
    assert effects.constants(first.shape) is constants and constants.glare.shape == (16, 32, 3)
    for twin in (copy.deepcopy(effects), pickle.loads(pickle.dumps(effects))):
        assert twin._constants == {}
        assert twin.rng.bit_generator.state == effects.rng.bit_generator.state
        cached = copy.deepcopy(effects)
        cached._constants.update(effects._constants)  # the same generator state, constants already made
        assert imaging.apply(frame, depth, twin).tobytes() == imaging.apply(frame, depth, cached).tobytes()


@pytest.mark.parametrize("name", ["town-rain", "arid-glare", "rural-night", "forest-fog", "rural"])
def test_a_frame_makes_few_full_size_temporaries(name):
    """At 66x200, forming a frame peaks at 2.5 float32 images of numpy memory (it took 3 to 4.3:
    a new array per operation, the glare recomputed per frame); traced, not timed."""
    composition = conditions.CONDITIONS[name]
    effects = imaging.draw_effects(conditions.WEATHER[composition.weather], conditions.CAMERAS[composition.camera],
                                   np.random.default_rng(0))
    frame, depth = _inputs(np.random.default_rng(1), (66, 200))
    imaging.apply(frame, depth, effects)  # the episode's constants are made by the first frame
    tracemalloc.start()
    try:
        imaging.apply(frame, depth, effects)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 2.5 * frame.size * np.dtype(np.float32).itemsize, peak


def test_no_effects_returns_the_frame_itself():
    frame = np.zeros((4, 4, 3), np.uint8)
    assert imaging.apply(frame, None, None) is frame
