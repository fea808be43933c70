"""The vehicle: a full-size car simulated as a PyBullet multibody.

The car is generated as a URDF from :class:`VehicleParams` (no downloads): a chassis
box, two steering knuckles carrying the front wheels, and two driven rear wheels. The
tyres are cylinders whose contact with the ground plane produces the lateral forces
that make the car turn, so slip, weight transfer and body roll come from PyBullet's
physics, not from a kinematic bicycle model.

Two controllers sit between the policy and the joints:

- :class:`SteeringActuator` maps the normalised steering command in [-1, 1] to a
  road-wheel angle through a pure delay (latency in control steps), a saturation at
  ``max_wheel_angle`` and a rate limit, then sets the two knuckles with Ackermann
  geometry;
- :class:`CruiseController` is a PI speed controller whose throttle in [-1, 1] is
  turned into drive torque on the rear wheels (or brake torque when negative).

Frames: the base link (and the centre of mass) sits at the middle of the wheelbase, at axle height; x forward,
y left, z up. ``pose()`` reports that point on the ground plane.

On a graded road the car drives in the road's frame (``sim.env``): on a level plane under gravity
tilted like the road under it, its pose mapped onto the road for the cameras. It is loaded
without visuals there (``visible=False``; a visual stand-in shows it in the chase view), and its
speed is scaled from the plane to the road (``speed_scale``, 1 / cos(grade angle)).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import tempfile
from collections import deque
from dataclasses import dataclass

import pybullet as p

from steerloop.files import atomic_write

GRAVITY = 9.81  # [m/s^2]


@dataclass(frozen=True)
class VehicleParams:
    """Geometry, mass and actuator limits of the simulated car."""

    wheelbase: float = 2.7
    """Distance between front and rear axles [m]."""
    track_width: float = 1.55
    """Distance between left and right wheel centres [m]."""
    wheel_radius: float = 0.33
    """[m]"""
    wheel_width: float = 0.22
    """[m]"""
    body_length: float = 4.5
    """[m]"""
    body_width: float = 1.8
    """[m]"""
    body_height: float = 1.2
    """[m], chassis box height (bottom sits 0.15 m above the axles)."""
    mass: float = 1500.0
    """Chassis mass [kg]."""
    wheel_mass: float = 20.0
    """[kg] per wheel."""
    tyre_friction: float = 1.0
    """Coulomb friction coefficient between tyre and road (dry asphalt is about 1).
    The tyre's collision shape is a sphere of the wheel radius (one clean contact point;
    PyBullet's cylinder contacts chatter); it is drawn as a cylinder."""
    max_wheel_angle: float = 0.5
    """Road-wheel angle at full steering command [rad] (about 28.6 degrees)."""
    max_steer_rate: float = 1.0
    """Rate limit of the road-wheel angle [rad/s]."""
    steer_latency_steps: int = 1
    """Pure delay between a steering command and the actuator, in control steps."""
    max_drive_torque: float = 900.0
    """Drive torque per rear wheel at throttle 1 [N m]; negative throttle brakes."""

    def __post_init__(self):
        positive = ("wheelbase", "track_width", "wheel_radius", "wheel_width", "body_length",
                    "body_width", "body_height", "mass", "wheel_mass", "max_wheel_angle",
                    "max_steer_rate", "max_drive_torque")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"VehicleParams.{name} must be a positive number, got {value!r}")
        if not 0 < self.max_wheel_angle < math.pi / 2:
            raise ValueError(
                f"VehicleParams.max_wheel_angle must be in (0, pi/2) rad, got {self.max_wheel_angle}"
            )
        if not (isinstance(self.steer_latency_steps, int) and self.steer_latency_steps >= 0):
            raise ValueError(
                "VehicleParams.steer_latency_steps must be a non-negative integer, "
                f"got {self.steer_latency_steps!r}"
            )


# Cruise control gains (throttle per unit speed error).
KP_SPEED = 0.5  # [1/(m/s)]
KI_SPEED = 0.2  # [1/m]
MAX_SPEED_INTEGRAL = 0.5  # [m], anti-windup bound on the integrated speed error


class CruiseController:
    """PI controller that holds a target speed; output is throttle in [-1, 1]."""

    def __init__(self):
        self.integral = 0.0

    def reset(self) -> None:
        self.integral = 0.0

    def __call__(self, target_speed: float, speed: float, dt: float) -> float:
        error = target_speed - speed
        proportional = KP_SPEED * error
        # Conditional integration: stop integrating while the output is saturated (anti-windup).
        if abs(proportional + KI_SPEED * self.integral) < 1.0:
            self.integral = min(max(self.integral + error * dt, -MAX_SPEED_INTEGRAL), MAX_SPEED_INTEGRAL)
        return min(max(proportional + KI_SPEED * self.integral, -1.0), 1.0)


class SteeringActuator:
    """Normalised command -> road-wheel angle, with latency, saturation and rate limit."""

    def __init__(self, params: VehicleParams, control_dt: float):
        self.params = params
        self.control_dt = control_dt
        self._queue: deque[float] = deque()
        self.angle = 0.0

    def reset(self, angle: float = 0.0, command: float | None = None) -> None:
        """Wheels at ``angle`` [rad]; the delay line full of ``command`` (default: the angle's)."""
        self.angle = float(angle)
        if command is None:
            command = self.angle / self.params.max_wheel_angle
        self._queue = deque([float(command)] * self.params.steer_latency_steps)

    def __call__(self, command: float) -> float:
        """Feed this step's command; returns the wheel angle [rad] the actuator now holds."""
        self._queue.append(float(command))
        delayed = min(max(self._queue.popleft(), -1.0), 1.0)
        target = delayed * self.params.max_wheel_angle
        max_delta = self.params.max_steer_rate * self.control_dt
        self.angle += min(max(target - self.angle, -max_delta), max_delta)
        return self.angle


def ackermann(params: VehicleParams, angle: float) -> tuple[float, float]:
    """(left, right) knuckle angles [rad] for a road-wheel ``angle``: the inner wheel turns more."""
    L, half_tw = params.wheelbase, params.track_width / 2
    if abs(angle) < 1e-9:
        return 0.0, 0.0
    radius = L / math.tan(angle)  # signed turn radius of the axle centre, + = left
    return math.atan(L / (radius - half_tw)), math.atan(L / (radius + half_tw))


def vehicle_urdf(params: VehicleParams, visible: bool = True) -> str:
    """URDF text of the car described by ``params`` (without its visual elements if not ``visible``)."""
    half_wb, half_tw = params.wheelbase / 2, params.track_width / 2
    r, w, m = params.wheel_radius, params.wheel_width, params.wheel_mass
    bl, bw, bh, M = params.body_length, params.body_width, params.body_height, params.mass
    body_z = 0.15 + bh / 2
    wheel_ixx = m * (3 * r * r + w * w) / 12
    wheel_iyy = m * r * r / 2

    def box_inertia(mass, x, y, z):
        return (f'<inertia ixx="{mass * (y * y + z * z) / 12:.6g}" iyy="{mass * (x * x + z * z) / 12:.6g}" '
                f'izz="{mass * (x * x + y * y) / 12:.6g}" ixy="0" ixz="0" iyz="0"/>')

    def wheel_link(name):
        cyl = f'<cylinder radius="{r}" length="{w}"/>'
        return f"""
  <link name="{name}">
    <inertial><mass value="{m}"/><inertia ixx="{wheel_ixx:.6g}" iyy="{wheel_iyy:.6g}" izz="{wheel_ixx:.6g}" ixy="0" ixz="0" iyz="0"/></inertial>
    <visual><origin rpy="1.5708 0 0"/><geometry>{cyl}</geometry><material name="tyre"><color rgba="0.08 0.08 0.08 1"/></material></visual>
    <collision><geometry><sphere radius="{r}"/></geometry></collision>
  </link>"""

    def knuckle(name):
        return f"""
  <link name="{name}">
    <inertial><mass value="2"/><inertia ixx="0.01" iyy="0.01" izz="0.01" ixy="0" ixz="0" iyz="0"/></inertial>
  </link>"""

    def joint(name, kind, parent, child, xyz, axis, limits=""):
        return f"""
  <joint name="{name}" type="{kind}">
    <parent link="{parent}"/><child link="{child}"/>
    <origin xyz="{xyz[0]} {xyz[1]} {xyz[2]}"/><axis xyz="{axis}"/>{limits}
  </joint>"""

    steer_limit = (f'<limit lower="{-params.max_wheel_angle * 1.2:.4f}" '
                   f'upper="{params.max_wheel_angle * 1.2:.4f}" effort="1e6" velocity="10"/>')
    cabin_z = body_z + bh / 2 + 0.25
    text = f"""<?xml version="1.0"?>
<robot name="steerloop_car">
  <link name="chassis">
    <inertial><origin xyz="0 0 0"/><mass value="{M}"/>{box_inertia(M, bl, bw, bh)}</inertial>
    <visual><origin xyz="0 0 {body_z}"/><geometry><box size="{bl} {bw} {bh}"/></geometry><material name="paint"><color rgba="0.75 0.1 0.1 1"/></material></visual>
    <visual><origin xyz="-0.4 0 {cabin_z}"/><geometry><box size="{bl * 0.5} {bw * 0.9} 0.5"/></geometry><material name="glass"><color rgba="0.2 0.25 0.3 1"/></material></visual>
    <collision><origin xyz="0 0 {body_z}"/><geometry><box size="{bl} {bw} {bh}"/></geometry></collision>
  </link>{knuckle("front_left_knuckle")}{knuckle("front_right_knuckle")}{wheel_link("front_left_wheel")}{wheel_link("front_right_wheel")}{wheel_link("rear_left_wheel")}{wheel_link("rear_right_wheel")}{joint("front_left_steer", "revolute", "chassis", "front_left_knuckle", (half_wb, half_tw, 0), "0 0 1", steer_limit)}{joint("front_right_steer", "revolute", "chassis", "front_right_knuckle", (half_wb, -half_tw, 0), "0 0 1", steer_limit)}{joint("front_left_spin", "continuous", "front_left_knuckle", "front_left_wheel", (0, 0, 0), "0 1 0")}{joint("front_right_spin", "continuous", "front_right_knuckle", "front_right_wheel", (0, 0, 0), "0 1 0")}{joint("rear_left_spin", "continuous", "chassis", "rear_left_wheel", (-half_wb, half_tw, 0), "0 1 0")}{joint("rear_right_spin", "continuous", "chassis", "rear_right_wheel", (-half_wb, -half_tw, 0), "0 1 0")}
</robot>
"""
    if not visible:
        text = re.sub(r"\n?\s*<visual>.*?</visual>", "", text)
    return text


def _urdf_path(params: VehicleParams, visible: bool = True) -> str:
    """Path of the URDF for ``params``, written once into the temp directory (named by content)."""
    text = vehicle_urdf(params, visible)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"steerloop_car_{digest}.urdf")
    if not os.path.exists(path):
        atomic_write(path, text, shared=True)
    return path


class Vehicle:
    """A car in a PyBullet client: load once, then ``reset`` and ``apply`` each control step."""

    def __init__(self, client, params: VehicleParams, control_dt: float, visible: bool = True, floor: float = 0.0):
        self.client = client
        self.speed_scale = 1.0  # [-] forward_speed() = the base's speed along its heading x this
        self.floor = floor  # [m] height of the plane the car stands on
        self.params = params
        self.control_dt = control_dt
        self.steering = SteeringActuator(params, control_dt)
        self.cruise = CruiseController()
        self._base, self._pose, self._speed = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)), (0.0, 0.0, 0.0), 0.0
        self.throttle = 0.0
        self._drive_torque = 0.0
        self.body_id = client.loadURDF(_urdf_path(params, visible), basePosition=[0, 0, floor + params.wheel_radius],
                                       flags=p.URDF_USE_INERTIA_FROM_FILE)
        names = {client.getJointInfo(self.body_id, j)[1].decode(): j
                 for j in range(client.getNumJoints(self.body_id))}
        self.steer_joints = (names["front_left_steer"], names["front_right_steer"])
        self.front_wheels = (names["front_left_spin"], names["front_right_spin"])
        self.rear_wheels = (names["rear_left_spin"], names["rear_right_spin"])
        self.wheel_links = self.front_wheels + self.rear_wheels
        for link in range(-1, client.getNumJoints(self.body_id)):
            # PyBullet's default damping (0.04) would act like a parking brake on a 1.5 t car.
            client.changeDynamics(self.body_id, link, linearDamping=0.0, angularDamping=0.0, jointDamping=0.0)
        for link in self.wheel_links:
            client.changeDynamics(self.body_id, link, lateralFriction=params.tyre_friction,
                                  rollingFriction=0.0, spinningFriction=0.0)
        # Free-rolling wheels: disable the default velocity motors of the spin joints.
        client.setJointMotorControlArray(self.body_id, list(self.wheel_links), p.VELOCITY_CONTROL,
                                         forces=[0.0] * 4)

    def reset(self, x: float, y: float, yaw: float, speed: float, wheel_angle: float = 0.0,
              command: float | None = None) -> None:
        """Place the car on the ground at (x, y, yaw), rolling at ``speed`` [m/s] with its front
        wheels at ``wheel_angle`` [rad] and ``command`` (normalised; default: the wheel angle's)
        waiting in the steering actuator's delay line."""
        c, r = self.client, self.params.wheel_radius
        c.resetBasePositionAndOrientation(self.body_id, [x, y, self.floor + r], c.getQuaternionFromEuler([0, 0, yaw]))
        c.resetBaseVelocity(self.body_id, [speed * math.cos(yaw), speed * math.sin(yaw), 0.0], [0, 0, 0])
        for joint, angle in zip(self.steer_joints, ackermann(self.params, wheel_angle)):
            c.resetJointState(self.body_id, joint, angle, 0.0)
        for joint in self.wheel_links:
            c.resetJointState(self.body_id, joint, 0.0, speed / r)
        self.steering.reset(wheel_angle, command)
        self.cruise.reset()
        self.throttle = 0.0
        self._drive_torque = 0.0
        self._set_wheel_angle(wheel_angle)
        self.refresh()

    def _set_wheel_angle(self, angle: float) -> None:
        left, right = ackermann(self.params, angle)
        self.client.setJointMotorControlArray(
            self.body_id, list(self.steer_joints), p.POSITION_CONTROL, targetPositions=[left, right],
            forces=[2e5, 2e5], positionGains=[0.5, 0.5])

    def apply(self, steering_command: float, target_speed: float | None) -> None:
        """Set the actuators for the next control step (once per control step, before stepping).

        With ``target_speed`` the cruise controller chooses the throttle; with None the
        throttle is left to :meth:`set_throttle`.
        """
        self._set_wheel_angle(self.steering(steering_command))
        if target_speed is not None:
            self.set_throttle(self.cruise(target_speed, self.forward_speed(), self.control_dt))

    def set_throttle(self, throttle: float) -> None:
        """Throttle in [-1, 1]: drive torque on the rear wheels, or brakes on all four when negative."""
        self.throttle = min(max(float(throttle), -1.0), 1.0)
        self._drive_torque = max(self.throttle, 0.0) * self.params.max_drive_torque
        brake = max(-self.throttle, 0.0) * self.params.max_drive_torque
        # Brakes act as a velocity motor towards standstill on all four wheels.
        self.client.setJointMotorControlArray(self.body_id, list(self.wheel_links), p.VELOCITY_CONTROL,
                                              targetVelocities=[0.0] * 4, forces=[brake] * 4)

    def step_physics(self, substeps: int) -> None:
        """Advance the world by ``substeps`` physics steps with the current actuator settings.

        PyBullet clears joint torques after every step, so the drive torque is re-applied
        before each one.
        """
        torques = [self._drive_torque, self._drive_torque]
        rear = list(self.rear_wheels)
        for _ in range(substeps):
            self.client.setJointMotorControlArray(self.body_id, rear, p.TORQUE_CONTROL, forces=torques)
            self.client.stepSimulation()
        self.refresh()

    @property
    def wheel_angle(self) -> float:
        return self.steering.angle

    def refresh(self) -> None:
        """Read the base state from PyBullet once; ``pose``/``forward_speed``/``base_state`` use it."""
        position, orientation = self.client.getBasePositionAndOrientation(self.body_id)
        (vx, vy, _), _ = self.client.getBaseVelocity(self.body_id)
        yaw = self.client.getEulerFromQuaternion(orientation)[2]
        self._base = (position, orientation)
        self._pose = (position[0], position[1], yaw)
        self._speed = vx * math.cos(yaw) + vy * math.sin(yaw)

    def pose(self) -> tuple[float, float, float]:
        """(x [m], y [m], yaw [rad]) of the wheelbase midpoint."""
        return self._pose

    def base_state(self):
        """Position and orientation quaternion of the base link (for cameras)."""
        return self._base

    def forward_speed(self) -> float:
        """Speed along the car's heading [m/s] (negative when reversing), times ``speed_scale``."""
        return self._speed * self.speed_scale

    def controller_state(self) -> dict:
        """The controllers' memory that PyBullet does not hold (actuator delay line and angle,
        cruise integral, throttle, drive torque, speed scale) and the base state, for copying the car."""
        return {"steering": copy.deepcopy(self.steering), "cruise": copy.deepcopy(self.cruise),
                "throttle": self.throttle, "drive_torque": self._drive_torque, "base": self._base,
                "speed_scale": self.speed_scale}

    def restore_controller_state(self, state: dict) -> None:
        """Restore :meth:`controller_state` after the physics state was restored; re-reads the base."""
        self.steering = copy.deepcopy(state["steering"])
        self.cruise = copy.deepcopy(state["cruise"])
        self.throttle, self._drive_torque = state["throttle"], state["drive_torque"]
        self.speed_scale = state["speed_scale"]
        self.refresh()
