"""Tests for sim.vehicle: steering actuator, cruise controller, parameter validation and
the PyBullet car's physics on a flat plane."""

from __future__ import annotations

import math

import numpy as np
import pybullet as p
import pytest
from pybullet_utils import bullet_client

from steerloop.sim.vehicle import (
    KI_SPEED,
    KP_SPEED,
    MAX_SPEED_INTEGRAL,
    CruiseController,
    SteeringActuator,
    Vehicle,
    VehicleParams,
)

DT = 0.05  # [s] control step (20 Hz)
PHYSICS_HZ = 240
SUBSTEPS = PHYSICS_HZ // 20


# ---------------------------------------------------------------- steering actuator
@pytest.mark.parametrize("latency", [0, 1, 3])
def test_actuator_latency(latency):
    params = VehicleParams(steer_latency_steps=latency, max_steer_rate=100.0)  # rate limit out of the way
    actuator = SteeringActuator(params, DT)
    actuator.reset()
    angles = [actuator(0.4) for _ in range(latency + 2)]
    assert angles[:latency] == [0.0] * latency
    assert angles[latency] == pytest.approx(0.4 * params.max_wheel_angle)
    assert angles[latency + 1] == pytest.approx(0.4 * params.max_wheel_angle)


def test_actuator_latency_preserves_command_order():
    params = VehicleParams(steer_latency_steps=2, max_steer_rate=100.0)
    actuator = SteeringActuator(params, DT)
    actuator.reset()
    commands = [0.1, -0.2, 0.3, 0.0, 0.5]
    angles = [actuator(c) for c in commands]
    assert angles == pytest.approx([0.0, 0.0] + [c * params.max_wheel_angle for c in commands[:3]])


def test_actuator_rate_limit():
    params = VehicleParams(steer_latency_steps=0, max_steer_rate=1.0, max_wheel_angle=0.5)
    actuator = SteeringActuator(params, DT)
    actuator.reset()
    max_delta = params.max_steer_rate * DT
    angles = [0.0] + [actuator(1.0) for _ in range(15)] + [actuator(-1.0) for _ in range(25)]
    deltas = np.abs(np.diff(angles))
    assert deltas.max() <= max_delta + 1e-12
    # Full lock is reached after exactly max_wheel_angle / (rate * dt) = 10 steps, not earlier.
    assert angles[9] < params.max_wheel_angle
    assert angles[10] == pytest.approx(params.max_wheel_angle)
    assert angles[-1] == pytest.approx(-params.max_wheel_angle)


def test_actuator_saturates_at_max_wheel_angle():
    params = VehicleParams(steer_latency_steps=0, max_steer_rate=100.0, max_wheel_angle=0.4)
    actuator = SteeringActuator(params, DT)
    actuator.reset()
    assert actuator(1.0) == pytest.approx(0.4)
    assert actuator(-1.0) == pytest.approx(-0.4)


def test_actuator_saturates_commands_beyond_full_lock():
    params = VehicleParams(steer_latency_steps=0, max_steer_rate=100.0, max_wheel_angle=0.4)
    actuator = SteeringActuator(params, DT)
    actuator.reset()
    assert abs(actuator(1.5)) <= 0.4 + 1e-12
    assert abs(actuator(-3.0)) <= 0.4 + 1e-12


def test_actuator_reset_fills_queue_with_current_angle():
    params = VehicleParams(steer_latency_steps=2, max_steer_rate=100.0)
    actuator = SteeringActuator(params, DT)
    actuator.reset(0.2)
    assert actuator.angle == 0.2
    assert actuator(0.0) == pytest.approx(0.2)  # still holding the reset angle during the delay
    assert actuator(0.0) == pytest.approx(0.2)
    assert actuator(0.0) == pytest.approx(0.0)


# ---------------------------------------------------------------- cruise controller
def test_cruise_throttle_sign():
    cruise = CruiseController()
    assert cruise(10.0, 9.5, DT) > 0  # too slow -> accelerate
    cruise.reset()
    assert cruise(10.0, 10.5, DT) < 0  # too fast -> brake
    cruise.reset()
    assert cruise(10.0, 10.0, DT) == 0.0


def test_cruise_small_error_is_proportional_plus_integral():
    cruise = CruiseController()
    throttle = cruise(10.0, 9.8, DT)
    assert throttle == pytest.approx(KP_SPEED * 0.2 + KI_SPEED * 0.2 * DT)


def test_cruise_throttle_is_clipped_and_integral_bounded():
    cruise = CruiseController()
    assert cruise(30.0, 0.0, DT) == 1.0
    assert cruise(0.0, 30.0, DT) == -1.0
    cruise.reset()
    for _ in range(10_000):
        assert -1.0 <= cruise(40.0, 0.0, DT) <= 1.0
    assert cruise.integral == 0.0  # saturated output: conditional integration winds nothing up
    for _ in range(10_000):
        cruise(10.0, 9.0, DT)  # unsaturated, persistent error: the integral stops at its bound
    assert cruise.integral == pytest.approx(MAX_SPEED_INTEGRAL)
    cruise.reset()
    assert cruise.integral == 0.0


# ---------------------------------------------------------------- parameter validation
@pytest.mark.parametrize("field, value, message", [
    ("wheelbase", -1.0, "VehicleParams.wheelbase must be a positive number"),
    ("mass", 0.0, "VehicleParams.mass must be a positive number"),
    ("wheel_radius", float("nan"), "VehicleParams.wheel_radius must be a positive number"),
    ("max_steer_rate", float("inf"), "VehicleParams.max_steer_rate must be a positive number"),
    ("max_wheel_angle", 2.0, r"VehicleParams.max_wheel_angle must be in \(0, pi/2\)"),
    ("steer_latency_steps", -1, "VehicleParams.steer_latency_steps must be a non-negative integer"),
    ("steer_latency_steps", 1.5, "VehicleParams.steer_latency_steps must be a non-negative integer"),
])
def test_vehicle_params_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        VehicleParams(**{field: value})


# ---------------------------------------------------------------- physics on a flat plane
@pytest.fixture
def flat_world():
    """A PyBullet DIRECT world with only a ground plane; yields a factory for a car on it."""
    client = bullet_client.BulletClient(connection_mode=p.DIRECT)
    client.setGravity(0, 0, -9.81)
    client.setPhysicsEngineParameter(fixedTimeStep=1.0 / PHYSICS_HZ, numSubSteps=0, deterministicOverlappingPairs=1)
    plane = client.createMultiBody(baseMass=0, baseCollisionShapeIndex=client.createCollisionShape(p.GEOM_PLANE))
    client.changeDynamics(plane, -1, lateralFriction=1.0, rollingFriction=0.0, spinningFriction=0.0)

    def add_car(params: VehicleParams) -> Vehicle:
        return Vehicle(client, params, DT)

    yield add_car
    client.disconnect()


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (Kasa) circle fit -> (cx, cy, radius)."""
    a = np.c_[2 * x, 2 * y, np.ones_like(x)]
    (cx, cy, k), *_ = np.linalg.lstsq(a, x ** 2 + y ** 2, rcond=None)
    return float(cx), float(cy), float(math.sqrt(k + cx ** 2 + cy ** 2))


def _drive(vehicle: Vehicle, command: float, target_speed: float, seconds: float):
    poses, speeds = [], []
    for _ in range(int(round(seconds / DT))):
        vehicle.apply(command, target_speed)
        vehicle.step_physics(SUBSTEPS)
        poses.append(vehicle.pose())
        speeds.append(vehicle.forward_speed())
    return np.array(poses), np.array(speeds)


@pytest.mark.parametrize("radius", [25.0, -40.0], ids=["left-25m", "right-40m"])
def test_constant_wheel_angle_drives_a_kinematic_circle(flat_world, radius):
    params = VehicleParams(steer_latency_steps=0, max_steer_rate=10.0)
    vehicle = flat_world(params)
    vehicle.reset(0.0, 0.0, 0.0, 10.0)
    angle = math.atan(params.wheelbase / radius)  # signed, + = left
    poses, speeds = _drive(vehicle, angle / params.max_wheel_angle, 10.0, seconds=12.0)
    assert vehicle.wheel_angle == pytest.approx(angle)
    settled = poses[int(2.0 / DT):]  # skip the turn-in transient
    cx, cy, fitted = _fit_circle(settled[:, 0], settled[:, 1])
    assert fitted == pytest.approx(abs(radius), rel=0.05)
    assert np.sign(cy) == np.sign(radius)  # left turn -> centre on the left (+y) of the start heading
    # The cruise controller holds 10 m/s (within 0.2 m/s) after 5 s, even while cornering.
    assert np.abs(speeds[int(5.0 / DT):] - 10.0).max() < 0.2


def test_cruise_holds_speed_on_straight(flat_world):
    vehicle = flat_world(VehicleParams())
    vehicle.reset(0.0, 0.0, 0.0, 10.0)
    poses, speeds = _drive(vehicle, 0.0, 10.0, seconds=8.0)
    assert np.abs(speeds[int(5.0 / DT):] - 10.0).max() < 0.2
    assert np.abs(poses[:, 1]).max() < 0.05  # straight ahead
    assert np.abs(poses[:, 2]).max() < 0.01
    assert poses[-1, 0] == pytest.approx(80.0, rel=0.02)


def test_cruise_reaches_target_from_rest_within_5s(flat_world):
    vehicle = flat_world(VehicleParams())
    vehicle.reset(0.0, 0.0, 0.0, 0.0)
    _, speeds = _drive(vehicle, 0.0, 10.0, seconds=8.0)
    assert np.abs(speeds[int(5.0 / DT):] - 10.0).max() < 0.2


def test_cruise_from_rest_settles_eventually(flat_world):
    vehicle = flat_world(VehicleParams())
    vehicle.reset(0.0, 0.0, 0.0, 0.0)
    _, speeds = _drive(vehicle, 0.0, 10.0, seconds=14.0)
    assert speeds[int(2.0 / DT)] > 5.0  # accelerates at several m/s^2
    assert speeds.max() < 12.5  # bounded overshoot
    assert np.abs(speeds[int(11.0 / DT):] - 10.0).max() < 0.2
