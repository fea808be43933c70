"""LaneKeep: keep a car centred in its lane from camera frames, in closed loop."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pybullet as p
from gymnasium import spaces
from pybullet_utils import bullet_client

from steerloop.errors import suggest
from steerloop.sim import controllers
from steerloop.sim.camera import (CAMERA_NAMES, FAR_PLANE, FOV_RANGE_DEG, MIN_SIZE, NEAR_PLANE, PITCH_RANGE_DEG,
                                  CameraSpec, body_camera_matrices, chase_camera_matrices, render)
from steerloop.sim import conditions as conditions_model
from steerloop.sim import imaging
from steerloop.sim import traffic as traffic_model
from steerloop.sim.scene import DRIVING_PLANE_Z, SEMANTIC_CLASSES, World, draw_appearance
from steerloop.sim.track import LaneState, Track, check_route_length, generate_track, split_seed
from steerloop.sim.vehicle import Vehicle, VehicleParams

GRAVITY = 9.81  # [m/s^2]
END_MARGIN = 10.0  # [m] the route ends this far before the end of the drawn road
MAX_SPEED_OBS = 60.0  # [m/s] upper bound of the speed observation
PRIVILEGED_BOUND = 1e3  # bound of the privileged feature observation
RENDER_SIZE = (240, 320)  # (H, W) [px] of the chase-camera view
REWARD_WEIGHTS = {  # reward = progress [m] minus these named penalties per control step
    "offset": 0.5,  # [1/m] x offset^2
    "heading": 2.0,  # [1/rad^2] x heading_error^2
    "steering_rate": 0.5,  # per unit |delta steering command|
    "departure": 5.0,  # once per lane departure event
    "off_road": 50.0,  # once, when the episode terminates off the road
}
OBSERVATION_MODES = ("dict", "image")
RESET_OPTIONS = ("track", "condition", "start_s", "start_offset", "start_heading", "start_speed", "start_wheel_angle",
                 "start_command", "start_time")  # reset(options=...) keys
EXTRA_OBSERVATIONS = ("depth", "semantic")  # optional observations the renderer gives in the same call


@dataclass
class LaneKeepConfig:
    """Everything that defines a LaneKeep environment. Every field is a ``gym.make`` keyword."""

    track: int | str | dict | None = None
    """The route: a procedural-track seed, a path to a JSON track spec, or a spec dict.
    None draws a procedural track of ``split`` with ``np_random`` at every reset."""
    split: str = "train"
    """Track split used when ``track`` is None: train, val or test (disjoint seed ranges)."""
    track_length: float = 400.0
    """Length of procedural routes [m], 10 to 4800 (``sim.track.MAX_ROUTE_LENGTH``)."""
    lane_width: float = 3.7
    """Lane width of procedural routes [m] (spec files give their own)."""
    condition: str | tuple[str, ...] = "default"
    """Visual condition name (``sim.conditions.CONDITIONS``, or ``scenery.weather.camera``), or
    several to draw one per reset with ``np_random``."""
    condition_file: str | dict | None = None
    """A JSON or TOML file of the user's own scenery, weather, camera values and named
    conditions (``sim.conditions.read_condition_file``), added to the built-in ones; or that
    file's parsed content as a dict (what worker processes receive: they never re-read the file)."""
    speed: float = 10.0
    """Cruise-control target speed [m/s]."""
    resolution: tuple[int, int] = (66, 200)
    """Camera image size (H, W) [px]."""
    cameras: tuple[str, ...] = ("center",)
    """Cameras rendered each step. The first is the observation's image; the others (PilotNet's
    side cameras, for recording recovery data) are in ``info["frames"]``, which is absent with
    one camera: no frame is handed out twice."""
    fov_deg: float = 45.0
    """Vertical field of view of the cameras [deg]."""
    camera_pitch_deg: float = 8.0
    """Downward pitch of the cameras [deg]."""
    camera_height: float = 1.4
    """Mounting height of the cameras above the ground [m]."""
    physics_hz: int = 240
    """Physics steps per second."""
    control_hz: int = 20
    """Control (action) steps per second; must divide ``physics_hz``."""
    steer_latency_steps: int = 1
    """Delay between a steering command and the actuator [control steps]."""
    max_wheel_angle: float = 0.5
    """Road-wheel angle at steering command 1 [rad]."""
    max_steer_rate: float = 1.0
    """Road-wheel angle rate limit [rad/s]."""
    departure_threshold: float = 1.0
    """|lateral offset| beyond which the car has departed its lane [m]."""
    offroad_threshold: float = 2.5
    """|lateral offset| that ends the episode (the car has left the lane for good) [m]."""
    expert: str = controllers.DEFAULT_EXPERT
    """Control law behind ``info["expert_steering"]``: stanley or pure_pursuit."""
    privileged: bool = False
    """Add ``observation["privileged"]``, the lane features the expert drivers read."""
    longitudinal: bool = False
    """If true the action is (steering, throttle) and the cruise controller is off."""
    observation: str = "dict"
    """``dict``: ``{"image", "speed"}`` (plus ``"privileged"``); ``image``: the camera frame alone,
    a ``Box`` that Box-only wrappers (ResizeObservation, GrayscaleObservation,
    NormalizeObservation) and SB3's ``CnnPolicy`` take directly. The cruise control holds the
    speed, so the image is enough to steer."""
    channels_first: bool = False
    """Images shaped (3, H, W) instead of (H, W, 3): PyTorch's layout, which SB3 uses as is (no
    ``VecTransposeImage``, so ``VecNormalize`` works with off-policy algorithms)."""
    extra_observations: tuple[str, ...] = ()
    """Add ``observation["depth"]`` (metric z-depth [m], float32) and/or ``observation["semantic"]``
    (class ids of ``sim.scene.SEMANTIC_CLASSES``, uint8) of the first camera: one channel, in the
    image's layout. The renderer gives both in the same call; the image is the same with or without."""

    def __post_init__(self):
        self.resolution = tuple(int(v) for v in self.resolution)
        self.cameras = tuple(self.cameras.split(",")) if isinstance(self.cameras, str) else tuple(self.cameras)
        if isinstance(self.condition, list):
            self.condition = tuple(self.condition)
        conditions = self.condition if isinstance(self.condition, tuple) else (self.condition,)
        available = self.condition_set
        for name in conditions:
            available.resolve(name)
        if not self.cameras or any(c not in CAMERA_NAMES for c in self.cameras):
            raise ValueError(f"cameras must be a non-empty subset of {CAMERA_NAMES}, got {self.cameras}")
        if len(self.resolution) != 2 or min(self.resolution) < MIN_SIZE:
            raise ValueError(f"resolution must be (H, W) with both >= {MIN_SIZE} px, got {self.resolution}")
        if self.physics_hz <= 0 or self.control_hz <= 0 or self.physics_hz % self.control_hz:
            raise ValueError(
                f"control_hz ({self.control_hz}) must be positive and divide physics_hz ({self.physics_hz}), "
                "e.g. physics_hz=240, control_hz=20")
        if not 0.0 < self.speed <= 40.0:
            raise ValueError(f"speed must be in (0, 40] m/s, got {self.speed}")
        if not 0.0 < self.departure_threshold < self.offroad_threshold:
            raise ValueError(
                f"need 0 < departure_threshold ({self.departure_threshold}) < offroad_threshold "
                f"({self.offroad_threshold})")
        if self.expert not in controllers.CONTROLLERS:
            raise ValueError(f"expert must be one of {sorted(controllers.CONTROLLERS)}, got {self.expert!r}")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {self.split!r}")
        self._check_cameras()
        check_route_length(self.track_length, "track_length")
        if self.observation not in OBSERVATION_MODES:
            raise ValueError(f"observation must be one of {OBSERVATION_MODES}, got {self.observation!r}")
        if self.observation == "image" and self.privileged:
            raise ValueError("privileged=True adds observation['privileged'], which needs observation='dict'; "
                             "with observation='image' read the lane state from info instead")
        if not isinstance(self.channels_first, bool):
            raise ValueError(f"channels_first must be True or False, got {self.channels_first!r}")
        self._check_extra_observations()

    def _check_extra_observations(self) -> None:
        extras = self.extra_observations
        extras = tuple(part for part in extras.split(",") if part) if isinstance(extras, str) else extras
        if not isinstance(extras, (tuple, list)) or not all(isinstance(name, str) for name in extras):
            raise ValueError(f"extra_observations must be a list of names from {EXTRA_OBSERVATIONS}, got {extras!r}")
        for name in extras:
            if name not in EXTRA_OBSERVATIONS:
                raise ValueError(f"extra_observations: unknown observation {name!r}"
                                 f"{suggest(name, EXTRA_OBSERVATIONS)}; valid names are {list(EXTRA_OBSERVATIONS)}")
        if len(set(extras)) != len(extras):
            raise ValueError(f"extra_observations names an observation twice: {list(extras)}")
        if extras and self.observation == "image":
            raise ValueError("extra_observations adds observation['depth'] / ['semantic'], which needs "
                             "observation='dict'")
        self.extra_observations = tuple(extras)

    def _check_cameras(self) -> None:
        """Camera geometry in the ranges the renderer supports (errors name the config field)."""
        for name, value, (low, high) in (("fov_deg", self.fov_deg, FOV_RANGE_DEG),
                                         ("camera_pitch_deg", self.camera_pitch_deg, PITCH_RANGE_DEG)):
            if not low <= value <= high:
                raise ValueError(f"{name} must be within [{low:g}, {high:g}] degrees, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def condition_set(self) -> conditions_model.ConditionSet:
        """The built-in conditions, plus those of ``condition_file``."""
        if self.condition_file is None:
            return conditions_model.BUILTIN
        if isinstance(self.condition_file, dict):
            return conditions_model.conditions_from_content(self.condition_file, "condition_file")
        if not isinstance(self.condition_file, (str, os.PathLike)):
            raise ValueError(f"condition_file must be a JSON/TOML file path or its parsed content (a dict), got "
                             f"{type(self.condition_file).__name__}")
        return conditions_model.load_condition_file(self.condition_file)

    @property
    def vehicle(self) -> VehicleParams:
        return VehicleParams(max_wheel_angle=self.max_wheel_angle, max_steer_rate=self.max_steer_rate,
                             steer_latency_steps=self.steer_latency_steps)


def _direct_client() -> bullet_client.BulletClient:
    """A headless PyBullet client. PyBullet prints ``argv[0]=`` on C-level stdout when it
    connects; that line is swallowed so commands printing JSON keep a clean stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            return bullet_client.BulletClient(connection_mode=p.DIRECT)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _save_physics(client) -> bytes:
    """The client's whole physics world (bodies, velocities, contact points) as Bullet-file bytes."""
    with tempfile.TemporaryDirectory(prefix="steerloop-") as folder:
        path = Path(folder) / "state.bullet"
        client.saveBullet(str(path))
        return path.read_bytes()


def _restore_physics(client, snapshot: bytes) -> None:
    """Restore :func:`_save_physics` bytes into ``client``, whose world must hold the same bodies."""
    with tempfile.TemporaryDirectory(prefix="steerloop-") as folder:
        path = Path(folder) / "state.bullet"
        path.write_bytes(snapshot)
        try:
            client.restoreState(fileName=str(path))
        except p.error as error:
            raise RuntimeError(f"could not restore the copied LaneKeep physics state: {error}") from None


def metric_depth(depth_buffer: np.ndarray) -> np.ndarray:
    """observation["depth"]: the renderer's non-linear [0, 1] depth buffer as distances [m] along
    the optical axis (z-depth), computed in float64 and stored as float32 within the near/far planes."""
    metres = imaging.linear_depth(depth_buffer.astype(np.float64))
    return np.clip(metres, NEAR_PLANE, FAR_PLANE).astype(np.float32)


def load_track(track: int | str | dict | Track, *, length: float = 400.0, lane_width: float = 3.7) -> Track:
    """A Track from a seed, a JSON spec path, a spec dict, or a Track."""
    if isinstance(track, Track):
        return track
    if isinstance(track, (int, np.integer)):
        return generate_track(int(track), length=length, lane_width=lane_width)
    if isinstance(track, dict):
        return Track.from_spec(track)
    if isinstance(track, (str, Path)):
        text = str(track)
        if text.lstrip("-").isdigit():
            return generate_track(int(text), length=length, lane_width=lane_width)
        return Track.from_json(text)
    raise TypeError(f"track must be a seed, a JSON spec path, a spec dict or a Track, got {type(track).__name__}")


def road_frame(elevation, s: float, offset: float, yaw: float, client, plan: tuple[float, float] | None = None):
    """The car's frame on a graded road.

    The car drives on a level plane whose (x, y) is the plan view, under gravity tilted as the road
    under it is tilted (docs/world.md, "Elevation"); the cameras see it on the road. Returns the
    road's point under the car at ``s``, banked ``offset`` (``plan``: its plan-view (x, y) if
    known), the rotation from the level plane to the road there (the car's heading ``yaw`` kept in
    plan view), and the ratio of speed along the road to speed in plan view (1 / cos(grade angle))."""
    point, roll, pitch = elevation.pose(s, offset, yaw)
    x, y, z = (float(v) for v in point)
    if plan is not None:
        x, y = plan
    on_road = np.asarray(client.getMatrixFromQuaternion(client.getQuaternionFromEuler([roll, pitch, yaw]))).reshape(3, 3)
    cos, sin = math.cos(yaw), math.sin(yaw)
    rotation = on_road @ np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])  # R_road Rz(-yaw)
    return np.array([x, y, z]), rotation, 1.0 / math.cos(pitch)


class LaneKeepEnv(gym.Env):
    """
    ## Description
    A full-size car (PyBullet rigid body, steerable front wheels, 2.7 m wheelbase) drives
    along a two-lane road at a speed held by cruise control. The policy sees the
    car-mounted camera and its speed and steers; it must stay centred in the right-hand
    lane until the end of the route.

    ## Action Space
    ``Box(-1, 1, (1,), float32)``: normalised steering, + = left. The actuator maps it to a
    road-wheel angle (``max_wheel_angle`` at 1) with ``steer_latency_steps`` of delay and a
    rate limit. With ``longitudinal=True`` the action is ``(steering, throttle)``.
    Out-of-range actions are clipped (``info["action_clipped"]``); NaN or inf raise ValueError.

    ## Observation Space
    ``Dict(image=Box(0, 255, (H, W, 3), uint8), speed=Box(-5, 60, (1,), float32))`` and,
    with ``privileged=True``, ``privileged=Box((FEATURE_SIZE,), float32)``: the lane features
    of :class:`sim.controllers.LaneFeatures` that the expert drivers use. With
    ``observation="image"`` the observation is the image ``Box`` alone; with
    ``channels_first=True`` images are shaped (3, H, W). ``extra_observations`` adds
    ``depth=Box(0.3, 9000, (H, W, 1), float32)`` (z-depth [m]) and/or
    ``semantic=Box(0, 5, (H, W, 1), uint8)`` (``sim.scene.SEMANTIC_CLASSES``) of the first
    camera, (1, H, W) with ``channels_first``; docs/environment.md.

    ## Rewards
    Progress along the centre line [m] minus the named penalties in ``REWARD_WEIGHTS``;
    the terms of each step are in ``info["reward_terms"]``.

    ## Episode End
    Terminated when |lateral offset| > ``offroad_threshold`` (``info["off_road"]``) or when
    the car reaches the end of the route (``info["success"]``). Truncated by gymnasium's
    TimeLimit (``max_episode_steps``, 3000 steps = 150 s by default).

    ## Info
    Privileged truth: ``lateral_offset`` [m, + left] and ``heading_error`` [rad] of the
    wheelbase midpoint, ``rear_heading_error`` [rad] (car yaw minus the road heading at the
    rear axle's projection: 0 in steady turning on any arc), ``progress`` [m], ``curvature``
    [1/m], ``speed`` [m/s], ``wheel_angle`` [rad], ``departure`` (this step is beyond
    ``departure_threshold``), ``departures`` (events so far), ``expert_steering`` (the
    expert's command for the current state), pose ``x``, ``y``, ``yaw``, ``time`` [s],
    ``steering`` and ``throttle`` executed, and, when ``cameras`` lists
    more than one camera, ``frames``: the other cameras' images by name (the first camera's
    image is the observation's, and is not repeated). On a graded road (a scenery with ``grade``
    or ``bank_deg``; docs/world.md, "Elevation") progress and heading stay in plan view, offsets
    are measured in the road's banked plane, ``speed`` is along the road, and ``x``, ``y``,
    ``yaw`` are the plan-view pose.

    ## Copies, close and reset
    ``copy.deepcopy(env)`` and a pickle round trip give an independent environment (its own
    PyBullet client) in the same state: world, car, controllers, ``np_random``, counters; the
    original and the copy then step bit-identically. ``close()`` frees the PyBullet client
    (calling it again is harmless); ``reset()`` after ``close()`` opens a new one, and ``step()``
    before ``reset()`` raises RuntimeError. ``metadata["render_fps"]`` is ``control_hz``.

    ## Arguments
    Every field of :class:`LaneKeepConfig` as a keyword, plus ``render_mode`` (``rgb_array``:
    a chase-camera view). ``reset(options=...)`` accepts ``track`` (seed, spec path, spec dict
    or Track), ``condition`` and a start state: ``start_s`` [m] along the route,
    ``start_offset`` [m] left of centre (on the road: within ``offroad_threshold``),
    ``start_heading`` [rad] relative to the road, ``start_speed`` [m/s] (default: the target
    speed), ``start_wheel_angle`` [rad] and ``start_command`` (the normalised command pending
    in the steering delay line; default: the wheel angle's) and ``start_time`` [s] (the episode
    clock, default 0: ``info["time"]`` counts from it and the moving cars of ``sim.traffic`` are
    where they are at that time). A driving log's state at step
    ``t`` (``progress``, ``lateral_offset``, ``heading_error``, ``speed``, ``wheel_angle``, ``time``
    and the ``steering`` of step ``t - 1``) restarts the car there
    (:func:`steerloop.evaluation.short_loop.logged_start`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode: str | None = None, config: LaneKeepConfig | None = None, **overrides):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        known = {f.name for f in fields(LaneKeepConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown LaneKeep option(s) {unknown}; valid options: {sorted(known)}")
        self.config = LaneKeepConfig(**{**(asdict(config) if config else {}), **overrides})
        self.render_mode = render_mode
        # One rendered frame per control step: videos play in real time at control_hz.
        self.metadata = {**type(self).metadata, "render_fps": self.config.control_hz}
        cfg = self.config
        height, width = cfg.resolution
        self.dt = 1.0 / cfg.control_hz
        self.substeps = cfg.physics_hz // cfg.control_hz
        self.vehicle_params = cfg.vehicle
        self.camera_specs = [CameraSpec(name=name, height=height, width=width, fov_deg=cfg.fov_deg,
                                        pitch_deg=cfg.camera_pitch_deg, mount_height=cfg.camera_height)
                             for name in cfg.cameras]
        self.expert_law = controllers.CONTROLLERS[cfg.expert]
        # The centre-line points ahead cost a little per step; only compute them when read.
        self.needs_lookahead = cfg.privileged or cfg.expert == "pure_pursuit"

        self.observation_space = self._observation_space()
        n_actions = 2 if cfg.longitudinal else 1
        self.action_space = spaces.Box(-1.0, 1.0, (n_actions,), np.float32)

        self.client = _direct_client()
        self.track: Track | None = None
        self.vehicle: Vehicle | None = None
        self.appearance = None
        self.conditions = cfg.condition_set
        self.effects: imaging.Effects | None = None
        self.episode_cameras: list[CameraSpec] = list(self.camera_specs)
        self.world: World | None = None
        self.route_length = 0.0
        self.condition = ""
        self.s = 0.0
        self.steps = 0
        self.start_time = 0.0  # [s] the episode clock at reset (reset option start_time)
        self.time = 0.0
        self.departures = 0
        self.in_departure = False
        self.last_command = 0.0
        self.lane = None
        self.rear_lane = None  # lane state of the rear axle centre (see _update_state)
        self.features: controllers.LaneFeatures | None = None
        self.frames: dict[str, np.ndarray] = {}
        self.depth: np.ndarray | None = None  # (H, W) float32 [m] of the first camera (extra_observations)
        self.semantic: np.ndarray | None = None  # (H, W) uint8 class ids of the first camera (extra_observations)
        self.semantic_table: np.ndarray | None = None  # class id by body id + 1 (sim.scene.World.semantic_table)
        self.trail: list[tuple[float, float]] = []
        self.traffic: traffic_model.TrafficPlan | None = None  # this episode's moving cars (sim.traffic)
        self.traffic_bodies: traffic_model.TrafficBodies | None = None  # their bodies in this client
        self._gravity = (0.0, 0.0, -GRAVITY)  # [m/s^2] the client's gravity (tilted on graded roads)
        self.stand_in: int | None = None  # graded roads, chase view: the body that shows the car
        # Graded roads: the road under the car (point [m]) and the rotation from the car's level
        # plane to the road there (road_frame); updated with the lane state.
        self.frame_point: np.ndarray | None = None
        self.frame_rotation: np.ndarray | None = None

    def _observation_space(self) -> spaces.Space:
        cfg = self.config
        height, width = cfg.resolution
        image = spaces.Box(0, 255, (3, height, width) if cfg.channels_first else (height, width, 3), np.uint8)
        if cfg.observation == "image":
            return image
        obs_spaces = {"image": image, "speed": spaces.Box(-5.0, MAX_SPEED_OBS, (1,), np.float32)}
        if cfg.privileged:
            obs_spaces["privileged"] = spaces.Box(-PRIVILEGED_BOUND, PRIVILEGED_BOUND,
                                                  (controllers.FEATURE_SIZE,), np.float32)
        channel = (1, height, width) if cfg.channels_first else (height, width, 1)
        if "depth" in cfg.extra_observations:
            obs_spaces["depth"] = spaces.Box(NEAR_PLANE, FAR_PLANE, channel, np.float32)
        if "semantic" in cfg.extra_observations:
            obs_spaces["semantic"] = spaces.Box(0, len(SEMANTIC_CLASSES) - 1, channel, np.uint8)
        return spaces.Dict(obs_spaces)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict:
        """Everything but the PyBullet client, with the physics world saved as a Bullet
        snapshot (bodies, velocities, contact points) and the car's controller memory, so a
        copy (pickle or ``copy.deepcopy``) continues bit-identically on its own client."""
        state = {key: value for key, value in self.__dict__.items()
                 if key not in ("client", "world", "vehicle", "traffic_bodies", "stand_in", "_gravity")}
        state["_closed"] = self.client is None
        state["_physics"] = None
        if self.client is not None and self.vehicle is not None:
            state["_physics"] = (_save_physics(self.client), self.vehicle.controller_state())
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        physics, closed = state.pop("_physics"), state.pop("_closed")
        self.__dict__.update(state)
        self.client, self.world, self.vehicle, self.traffic_bodies = None, None, None, None
        self.stand_in, self._gravity = None, (0.0, 0.0, -GRAVITY)
        if closed:
            return
        self.client = _direct_client()
        if physics is not None:
            snapshot, controller_state = physics
            self._build_world(self.track, self.condition)
            _restore_physics(self.client, snapshot)
            self.vehicle.restore_controller_state(controller_state)
            if self.vehicle.base_state() != controller_state["base"]:
                raise RuntimeError("the copied LaneKeep environment's car did not land where the original's is "
                                   "(the physics snapshot does not match the rebuilt world)")
            self._move_traffic()  # from the plan: wherever the snapshot put the bodies

    def _require_episode(self, method: str) -> None:
        """Clear errors (not asserts, which ``python -O`` strips) for calls without a live episode."""
        if self.client is None:
            raise RuntimeError(f"LaneKeepEnv.{method}() called after close(); call reset() to reopen the environment")
        if self.vehicle is None:
            raise RuntimeError(f"LaneKeepEnv.{method}() called before reset(); call env.reset(seed=...) first")

    # ------------------------------------------------------------------ world
    def _build_world(self, track: Track, condition: str) -> None:
        """Show ``track`` under ``condition`` and load a fresh car.

        The physics world (ground plane, sky) is created once per environment and road
        meshes once per distinct track; when the world holds ``ROADS_PER_WORLD`` roads the
        simulation is reset and a new world built, which frees their meshes (memory stays
        bounded over any number of tracks). The car is removed and loaded again every
        reset so no physics state survives an episode.
        """
        c = self.client
        track_key = json.dumps(track.to_spec(), sort_keys=True)
        if self.world is None or self.world.is_full_for(track_key, condition, self.conditions):
            c.resetSimulation()  # removes every body and frees every shape
            c.setGravity(0, 0, -GRAVITY)
            self._gravity = (0.0, 0.0, -GRAVITY)
            c.setPhysicsEngineParameter(fixedTimeStep=1.0 / self.config.physics_hz, numSubSteps=0,
                                        deterministicOverlappingPairs=1)
            self.world = World(c)
            self.vehicle, self.traffic_bodies, self.stand_in = None, None, None
        if self.vehicle is not None:
            c.removeBody(self.vehicle.body_id)
        if self.stand_in is not None:
            c.removeBody(self.stand_in)
            self.stand_in = None
        if self.traffic_bodies is not None:
            self.traffic_bodies.remove()
            self.traffic_bodies = None
        self.world.show(track, track_key, condition, self.conditions)
        self.world.paint(self.appearance)
        graded = self.world.elevation is not None
        self._set_gravity(None)  # level (a graded episode before tilts it)
        self.vehicle = Vehicle(c, self.vehicle_params, self.dt, visible=not graded,
                               floor=DRIVING_PLANE_Z if graded else 0.0)
        self.stand_in = self.world.car_stand_in(self.vehicle_params) if graded and self.render_mode else None
        if self.traffic is not None:  # after the car: its body (and the rest of the world) as without traffic
            self.traffic_bodies = traffic_model.TrafficBodies(c, self.world.car_shape(), self.traffic)
        if "semantic" in self.config.extra_observations:
            moving = self.traffic_bodies.ids if self.traffic_bodies is not None else ()
            self.semantic_table = self.world.semantic_table((self.vehicle.body_id, *moving))
        self.track = track
        self.route_length = max(track.length - END_MARGIN, 1.0)

    def _draw_track(self, options: dict) -> Track:
        cfg = self.config
        choice = options.get("track", cfg.track)
        if choice is None:
            index = int(self.np_random.integers(0, 100_000))
            choice = split_seed(cfg.split, index)
        return load_track(choice, length=cfg.track_length, lane_width=cfg.lane_width)

    def place_car(self, s: float, offset: float = 0.0, heading: float = 0.0, speed: float | None = None,
                  wheel_angle: float = 0.0, command: float | None = None) -> None:
        """Put the car at progress ``s`` [m], ``offset`` [m] left of centre, ``heading`` [rad]
        relative to the road, rolling at ``speed`` (default: the target speed), front wheels at
        ``wheel_angle`` [rad] with ``command`` pending in the steering delay line (default: the
        wheel angle's command). Used by ``reset`` and by the intervention wrapper."""
        self._require_episode("place_car")
        s = float(np.clip(s, 0.0, self.track.length))
        _, _, road_heading = self.track.pose(s)
        speed = self.config.speed if speed is None else speed
        elevation = self.elevation
        if elevation is None:
            x, y = self.track.lateral_points(s, offset)
            self.vehicle.reset(float(x), float(y), float(road_heading) + heading, speed, wheel_angle, command)
        else:  # in the road's frame: ``offset`` in its banked plane, ``speed`` along its surface
            x, y, _ = (float(v) for v in elevation.surface(s, offset))
            yaw = float(road_heading) + heading
            scale = road_frame(elevation, s, offset, yaw, self.client)[2]
            self.vehicle.reset(x, y, yaw, speed / scale, wheel_angle, command)
        self.s = s
        self._update_state()

    @property
    def elevation(self):
        """The shown road's height and bank (``sim.track.elevation.Elevation``), or None when it is level."""
        return self.world.elevation if self.world is not None else None

    def kick_heading(self, delta: float) -> None:
        """Rotate the car (and its velocity) by ``delta`` [rad] about the vertical, in place."""
        self._require_episode("kick_heading")
        c, body = self.client, self.vehicle.body_id
        position, orientation = c.getBasePositionAndOrientation(body)
        linear, angular = c.getBaseVelocity(body)
        roll, pitch, yaw = c.getEulerFromQuaternion(orientation)
        cos, sin = math.cos(delta), math.sin(delta)
        c.resetBasePositionAndOrientation(body, position, c.getQuaternionFromEuler([roll, pitch, yaw + delta]))
        c.resetBaseVelocity(body, [cos * linear[0] - sin * linear[1], sin * linear[0] + cos * linear[1], linear[2]],
                            angular)
        self.vehicle.refresh()
        self._update_state()

    def shift_lateral(self, delta: float) -> None:
        """Translate the car ``delta`` [m] sideways (+ = left of the road) keeping its velocity.

        Used by the lateral-push perturbation; the camera frames are refreshed by the next step.
        PyBullet's ``resetBasePositionAndOrientation`` zeroes a multibody's base velocity, so the
        velocity is put back (without that the push would stop the car).
        """
        self._require_episode("shift_lateral")
        c, body = self.client, self.vehicle.body_id
        position, orientation = c.getBasePositionAndOrientation(body)
        linear, angular = c.getBaseVelocity(body)
        heading = self.lane.road_heading
        moved = [position[0] - delta * math.sin(heading), position[1] + delta * math.cos(heading), position[2]]
        if self.elevation is not None:  # graded: ``delta`` in the banked plane, the level plane's share of it
            delta *= math.cos(float(self.elevation.superelevation(self.s)))
            moved = [position[0] - delta * math.sin(heading), position[1] + delta * math.cos(heading), position[2]]
        c.resetBasePositionAndOrientation(body, moved, orientation)
        c.resetBaseVelocity(body, linear, angular)
        self.vehicle.refresh()
        self._update_state(render_cameras=False)

    def current_observation(self) -> dict | np.ndarray:
        """The observation of the current state (after the car was moved by a wrapper); a copy."""
        self._require_episode("current_observation")
        obs = self._observation()
        return obs.copy() if isinstance(obs, np.ndarray) else {key: value.copy() for key, value in obs.items()}

    def extra_frames(self) -> dict[str, np.ndarray]:
        """Copies of the current frames of the cameras after the first (``info["frames"]``)."""
        self._require_episode("extra_frames")
        return {spec.name: self._layout(self.frames[spec.name]).copy() for spec in self.camera_specs[1:]}

    # ------------------------------------------------------------------ API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.client is None:  # closed: open a new client (the old world went with the old one)
            self.client = _direct_client()
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; valid options: {sorted(RESET_OPTIONS)}")
        start = self._start_state(options)
        track = self._draw_track(options)
        condition = options.get("condition", self.config.condition)
        if isinstance(condition, (tuple, list)):
            condition = str(condition[int(self.np_random.integers(len(condition)))])
        self.condition = condition
        self.appearance = draw_appearance(condition, self.np_random, self.conditions)
        composition = self.conditions.resolve(condition)
        self.effects = imaging.draw_effects(self.conditions.weather[composition.weather],
                                            self.conditions.camera[composition.camera], self.np_random)
        self.episode_cameras = [imaging.mounted(spec, self.effects) for spec in self.camera_specs]
        # drawn last (and only with traffic): every draw before it is what it was without traffic
        self.traffic = traffic_model.draw_plan(self.conditions.scenery[composition.scenery], self.np_random)
        self._build_world(track, condition)

        self.steps = 0
        self.start_time = start["time"]
        self.time = self.start_time
        self.departures = 0
        self.in_departure = False
        self.trail = []
        if start["s"] >= self.route_length:
            raise ValueError(f"reset option start_s={start['s']} m is at or past the end of the route "
                             f"({self.route_length:.1f} m on track {track.name}); give 0 <= start_s < route length")
        self.last_command = start["command"] if start["command"] is not None else 0.0
        self.place_car(start["s"], start["offset"], start["heading"], start["speed"], start["wheel_angle"],
                       start["command"])
        self.in_departure = abs(self.lane.offset) > self.config.departure_threshold
        return self._observation(), self._info(steering=0.0, throttle=0.0, clipped=False, terms={})

    def _start_state(self, options: dict) -> dict:
        """The reset options' start state, each value checked (a clear error names the option)."""
        cfg, params = self.config, self.vehicle_params
        limits = {  # option: (default, low, high, unit)
            "start_s": (0.0, 0.0, math.inf, "m"),
            "start_offset": (0.0, -cfg.offroad_threshold, cfg.offroad_threshold, "m"),
            "start_heading": (0.0, -math.pi / 2, math.pi / 2, "rad"),
            "start_speed": (None, 0.0, MAX_SPEED_OBS, "m/s"),
            "start_wheel_angle": (0.0, -params.max_wheel_angle, params.max_wheel_angle, "rad"),
            "start_command": (None, -1.0, 1.0, "normalised"),
            "start_time": (0.0, 0.0, math.inf, "s"),
        }
        start = {}
        for option, (default, low, high, unit) in limits.items():
            value = options.get(option, default)
            if value is not None:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"reset option {option} must be a number [{unit}], got {value!r}") from None
                if not (math.isfinite(value) and low <= value <= high):
                    hint = " (off the road: the car would start off_road)" if option == "start_offset" else ""
                    raise ValueError(f"reset option {option}={value} {unit} is outside [{low:g}, {high:g}]{hint}")
            start[option.removeprefix("start_")] = value
        return start

    def step(self, action):
        self._require_episode("step")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()} (check the policy's output for NaN/inf)")
        clipped = bool(np.any(np.abs(action) > 1.0))
        action = np.clip(action, -1.0, 1.0)
        steering = float(action[0])

        vehicle = self.vehicle
        if self.elevation is not None:  # the road's grade and bank under the car, as gravity in its frame
            self._set_gravity(self.frame_rotation.T @ (0.0, 0.0, -GRAVITY))
        vehicle.apply(steering, None if self.config.longitudinal else self.config.speed)
        if self.config.longitudinal:
            vehicle.set_throttle(float(action[1]))
        vehicle.step_physics(self.substeps)
        self.steps += 1
        self.time = self.start_time + self.steps * self.dt
        previous_s = self.s
        self._update_state()

        lane = self.lane
        departure_now = abs(lane.offset) > self.config.departure_threshold
        new_departure = departure_now and not self.in_departure
        self.in_departure = departure_now
        self.departures += int(new_departure)
        off_road = abs(lane.offset) > self.config.offroad_threshold
        success = (not off_road) and self.s >= self.route_length

        w = REWARD_WEIGHTS
        terms = {
            "progress": self.s - previous_s,
            "offset": -w["offset"] * lane.offset ** 2,
            "heading": -w["heading"] * lane.heading_error ** 2,
            "steering_rate": -w["steering_rate"] * abs(steering - self.last_command),
            "departure": -w["departure"] * float(new_departure),
            "off_road": -w["off_road"] * float(off_road),
        }
        self.last_command = steering
        info = self._info(steering=steering, throttle=vehicle.throttle, clipped=clipped, terms=terms)
        info["off_road"] = off_road
        info["success"] = success
        return self._observation(), float(sum(terms.values())), bool(off_road or success), False, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        self._require_episode("render")
        height, width = RENDER_SIZE
        self._move_traffic()
        position, _ = self.vehicle.base_state()
        if self.elevation is None:
            view, projection = chase_camera_matrices(self.client, position, self.vehicle.pose()[2], width, height)
            return render(self.client, width, height, view, projection, self.appearance.lighting)
        # graded: above the road under the car, looking at the road ahead; the car shown by its stand-in
        position, orientation = self._camera_base()
        ground = self.frame_point[2]
        ahead = float(self.elevation.height(self.s + 6.0)) - float(self.elevation.height(self.s))
        view, projection = chase_camera_matrices(self.client, position, self.vehicle.pose()[2], width, height,
                                                 ground=ground, ahead=ahead)
        self.client.resetBasePositionAndOrientation(self.stand_in, position, orientation)
        try:
            return render(self.client, width, height, view, projection, self.appearance.lighting)
        finally:  # out of every car camera's sight
            self.client.resetBasePositionAndOrientation(self.stand_in, traffic_model.HIDDEN, [0, 0, 0, 1])

    def top_down(self, size: int = 320) -> np.ndarray:
        """A (size, size, 3) uint8 map of the route, the car and its trail (for videos and plots)."""
        from steerloop.sim.topdown import draw_top_down

        self._require_episode("top_down")
        return draw_top_down(self.track, self.vehicle.pose(), self.trail, self.vehicle_params, size=size)

    def close(self):
        """Free the PyBullet client (safe to call twice); ``reset()`` opens a new one."""
        if getattr(self, "client", None) is not None:
            self.client.disconnect()
            self.client = None
        self.world, self.vehicle, self.traffic_bodies, self.stand_in = None, None, None, None

    # ------------------------------------------------------------------ internals
    def _update_state(self, render_cameras: bool = True) -> None:
        """Project the car onto the track, compute the expert's lane features, render."""
        track, params = self.track, self.vehicle_params
        x, y, yaw = self.vehicle.pose()
        half = params.wheelbase / 2
        c, s_ = math.cos(yaw), math.sin(yaw)
        # Graded roads: the car drives in the road's frame, whose level plane is the plan view.
        self.lane = self._banked(track.lane_state(x, y, yaw, s_hint=self.s))
        self.s = self.lane.s
        if self.elevation is not None:
            self.frame_point, self.frame_rotation, self.vehicle.speed_scale = road_frame(
                self.elevation, self.s, self.lane.offset, yaw, self.client, (x, y))
        (fx, fy), (rx, ry) = (x + half * c, y + half * s_), (x - half * c, y - half * s_)
        front = self._banked(track.lane_state(fx, fy, yaw, s_hint=self.s + half))
        # The rear axle centre: in steady turning its velocity, hence the car's heading, is
        # tangent to the road (the recovery metric's heading criterion; docs/metrics.md).
        rear = self._banked(track.lane_state(rx, ry, yaw, s_hint=max(self.s - half, 0.0)))
        self.rear_lane = rear
        lookahead = None
        if self.needs_lookahead:
            px, py, _ = track.pose(rear.s + controllers.LOOKAHEAD_DISTANCES)
            dx, dy = px - rx, py - ry
            lookahead = np.stack([c * dx + s_ * dy, -s_ * dx + c * dy], axis=1)
        self.features = controllers.LaneFeatures(
            offset=self.lane.offset, heading_error=self.lane.heading_error, front_offset=front.offset,
            front_heading_error=front.heading_error, front_curvature=front.curvature,
            speed=self.vehicle.forward_speed(), wheel_angle=self.vehicle.wheel_angle, lookahead=lookahead)
        self.trail.append((x, y))
        if render_cameras:
            self._render_cameras()

    def _banked(self, lane: LaneState) -> LaneState:
        """``lane`` with its offset measured in the banked plane of a graded road (OpenDRIVE's
        convention: horizontal offset / cos(superelevation) on the asphalt); level roads: ``lane``."""
        if self.elevation is None:
            return lane
        return dataclasses.replace(lane, offset=float(self.elevation.banked_offset(lane.s, lane.offset)))

    def _move_traffic(self) -> None:
        """Put the moving cars where they are now (a function of the time and the car's progress)."""
        if self.traffic_bodies is not None:
            self.traffic_bodies.place(self.track, self.traffic, self.time, self.s, self.vehicle_params.body_length,
                                      self.elevation)

    def _camera_base(self):
        """Position and orientation of the car's base as the cameras see it: on a graded road,
        the pose in its level plane mapped onto the road (``road_frame``)."""
        position, orientation = self.vehicle.base_state()
        if self.elevation is None:
            return position, orientation
        c, rotation = self.client, self.frame_rotation
        x, y, _ = self.vehicle.pose()
        body = rotation @ np.asarray(c.getMatrixFromQuaternion(orientation)).reshape(3, 3)
        moved = self.frame_point + rotation @ (np.asarray(position) - (x, y, self.vehicle.floor))
        euler = [math.atan2(body[2, 1], body[2, 2]), -math.asin(max(-1.0, min(1.0, body[2, 0]))),
                 math.atan2(body[1, 0], body[0, 0])]
        return moved.tolist(), c.getQuaternionFromEuler(euler)

    def _set_gravity(self, gravity) -> None:
        """Set the world's gravity vector (None: straight down), calling PyBullet only on a change."""
        gravity = (0.0, 0.0, -GRAVITY) if gravity is None else tuple(float(v) for v in gravity)
        if gravity != self._gravity:
            self.client.setGravity(*gravity)
            self._gravity = gravity

    def _render_cameras(self) -> None:
        self._move_traffic()
        position, orientation = self._camera_base()
        lighting = self.appearance.lighting
        self.frames = {}
        effects = self.effects
        extras = self.config.extra_observations
        for index, spec in enumerate(self.episode_cameras):
            view, projection = body_camera_matrices(self.client, spec, position, orientation,
                                                    self.vehicle_params.wheel_radius)
            want_depth = (effects is not None and effects.needs_depth) or (index == 0 and "depth" in extras)
            want_mask = index == 0 and "semantic" in extras
            if not (want_depth or want_mask):
                frame, depth = render(self.client, spec.width, spec.height, view, projection, lighting), None
            else:
                frame, *buffers = render(self.client, spec.width, spec.height, view, projection, lighting,
                                         depth=want_depth, segmentation=want_mask)
                depth = buffers[0] if want_depth else None
                if want_mask:
                    self.semantic = self.semantic_table[buffers[-1] + 1]
                if index == 0 and "depth" in extras:
                    self.depth = metric_depth(depth)
            self.frames[spec.name] = imaging.apply(frame, depth, effects)

    def expert_command(self, target_offset: float = 0.0) -> float:
        """The expert's normalised steering for the current state (towards ``target_offset``)."""
        params = self.vehicle_params
        return self.expert_law(self.features, params.wheelbase, params.max_wheel_angle, target_offset)

    def _layout(self, frame: np.ndarray) -> np.ndarray:
        """A rendered (H, W, 3) frame in the configured layout."""
        return np.ascontiguousarray(frame.transpose(2, 0, 1)) if self.config.channels_first else frame

    def _observation(self) -> dict | np.ndarray:
        image = self._layout(self.frames[self.camera_specs[0].name])
        if self.config.observation == "image":
            return image
        obs = {
            "image": image,
            "speed": np.array([min(max(self.features.speed, -5.0), MAX_SPEED_OBS)], dtype=np.float32),
        }
        if self.config.privileged:
            obs["privileged"] = np.clip(self.features.to_array(), -PRIVILEGED_BOUND, PRIVILEGED_BOUND)
        for name in self.config.extra_observations:
            plane = self.depth if name == "depth" else self.semantic
            obs[name] = plane[None] if self.config.channels_first else plane[..., None]
        return obs

    def _info(self, *, steering: float, throttle: float, clipped: bool, terms: dict) -> dict[str, Any]:
        x, y, yaw = self.vehicle.pose()
        lane = self.lane
        info = {
            "lateral_offset": lane.offset,
            "heading_error": lane.heading_error,
            "rear_heading_error": self.rear_lane.heading_error,
            "progress": self.s,
            "route_length": self.route_length,
            "curvature": lane.curvature,
            "speed": self.features.speed,
            "wheel_angle": self.vehicle.wheel_angle,
            "departure": abs(lane.offset) > self.config.departure_threshold,
            "departures": self.departures,
            "expert_steering": self.expert_command(),
            "steering": steering,
            "throttle": throttle,
            "action_clipped": clipped,
            "x": x, "y": y, "yaw": yaw,
            "time": self.time,
            "track": self.track.name,
            "condition": self.condition,
            "reward_terms": terms,
            "off_road": False,
            "success": False,
        }
        if len(self.camera_specs) > 1:
            info["frames"] = {spec.name: self._layout(self.frames[spec.name]) for spec in self.camera_specs[1:]}
        return info

