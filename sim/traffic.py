"""Moving vehicles: oncoming cars in the other lane and an optional lead car in the ego lane.

They are visual distractors, kinematic and without collision: each is a PyBullet body with a
visual shape and no collision shape (mass 0), moved with ``resetBasePositionAndOrientation``
before every render, so they never touch the ego car's physics (the ego trajectory is
byte-identical with and without them; only the frames differ).

Oncoming cars drive along the centre of the left lane (lateral offset ``+lane_width`` from the
ego lane's centre, the track's centre line) towards the ego car at ``Scenery.traffic_speed``.
Their positions along the road form a sequence drawn per episode from a generator seeded from
``np_random`` at reset: car ``k`` is at ``entries[k] - speed * time``, with gaps of at least
``MIN_GAP`` and a mean of ``1000 / Scenery.traffic`` metres, from ``ORIGIN`` whatever the start. Only the ``ONCOMING_BODIES`` nearest
cars not yet ``BEHIND`` the ego car get a body (PyBullet's tiny renderer pays per body): a car
that has passed behind the ego car gives its body to the next one ahead. What is shown is a pure
function of (time, ego progress) and the episode's generator, so reruns, copies and any order of
calls give the same frames, and a restart from a logged state (``start_s`` and ``start_time``
reset options, :func:`steerloop.evaluation.short_loop.logged_start`) shows the cars of the log.

The lead car drives in the ego lane ``Scenery.lead_gap`` metres (bumper to bumper) ahead of the
ego car's progress: it holds the gap whatever the ego car does, so it is never reached. Beyond
the ends of the drawn road the cars continue straight along its end tangent.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from steerloop.sim.conditions import MAX_TRAFFIC, Scenery
from steerloop.sim.scenery import box, merge
from steerloop.sim.track import Track
from steerloop.sim.track.elevation import Elevation

CAR_LENGTH, CAR_WIDTH = 4.4, 1.8  # [m] (the parked cars' size, sim.scenery)
ONCOMING_BODIES = 4  # bodies shared by the oncoming cars (at 20 cars/km they cover about 200 m ahead)
BEHIND = 20.0  # [m] an oncoming car this far behind the ego car (past the chase camera, 9 m back) is gone
MIN_GAP = 1000.0 / MAX_TRAFFIC  # [m] (20) least distance between consecutive oncoming cars
ORIGIN = -BEHIND  # [m] progress from which the sequence of oncoming cars starts, wherever the car starts
HIDDEN = (0.0, 0.0, -100.0)  # [m] where an unused body waits: under the ground, out of every camera's sight
CAR_COLOURS = (  # body paints, one drawn per car
    (0.80, 0.80, 0.82), (0.12, 0.12, 0.14), (0.55, 0.12, 0.12), (0.15, 0.25, 0.55), (0.45, 0.47, 0.50),
    (0.85, 0.78, 0.55), (0.20, 0.40, 0.25), (0.90, 0.55, 0.15),
)
SHADE_JITTER = 0.15  # [-] relative brightness jitter of each car's paint


def car_mesh():
    """Vertices, triangles and normals of a car (body and cabin boxes) at the origin, heading +x."""
    return merge([box(0.0, 0.0, 0.25, CAR_LENGTH, CAR_WIDTH, 0.8, 0.0),
                  box(-0.3, 0.0, 1.05, 2.4, 1.6, 0.5, 0.0)])


EGO_COLOURS = ((0.75, 0.1, 0.1), (0.2, 0.25, 0.3), (0.08, 0.08, 0.08))  # paint, glass, tyres (sim.vehicle's URDF)


def ego_meshes(params):
    """Meshes (vertices, triangles, normals) of the ego car's chassis, cabin and four wheels
    (boxes; ``EGO_COLOURS``), in its base frame (the wheelbase midpoint at axle height), from the
    ``sim.vehicle.VehicleParams`` ``params``: what the chase view of a graded road shows."""
    bottom = 0.15  # [m] the chassis starts this far above the axles (sim.vehicle.vehicle_urdf)
    chassis = box(0.0, 0.0, bottom, params.body_length, params.body_width, params.body_height, 0.0)
    cabin = box(-0.4, 0.0, bottom + params.body_height, params.body_length * 0.5, params.body_width * 0.9, 0.5, 0.0)
    half_wb, half_tw, r = params.wheelbase / 2, params.track_width / 2, params.wheel_radius
    wheels = merge([box(x, y, -r, 2 * r, params.wheel_width, 2 * r, 0.0)
                    for x in (-half_wb, half_wb) for y in (-half_tw, half_tw)])
    return chassis, cabin, wheels


def lane_pose(track: Track, s: float, offset: float) -> tuple[float, float, float]:
    """(x, y, heading) at progress ``s`` [m] and ``offset`` [m] left of the centre line,
    continuing straight along the end tangents beyond ``[0, track.length]``."""
    on_road = min(max(s, 0.0), track.length)
    x, y, heading = track.pose(on_road)
    beyond, cos, sin = s - on_road, math.cos(heading), math.sin(heading)
    return x + beyond * cos - offset * sin, y + beyond * sin + offset * cos, heading


@dataclass
class TrafficPlan:
    """One episode's moving vehicles (plain data: pickled and copied with the environment)."""

    density: float
    """Oncoming cars per km (``Scenery.traffic``); 0: none."""
    speed: float
    """Speed of the oncoming cars [m/s]."""
    lead_gap: float
    """Bumper-to-bumper gap of the lead car ahead of the ego car [m]; 0: no lead car."""
    rng: np.random.Generator
    """The episode's own generator (seeded from ``np_random``; never touches ``np_random`` again)."""
    lead_colour: tuple[float, float, float] | None = None
    entries: list[float] = field(default_factory=list)
    """Progress [m] of oncoming car k at time 0 (increasing; extended as cars are needed)."""
    colours: list[tuple[float, float, float]] = field(default_factory=list)
    """Paint of oncoming car k."""

    def _paint(self) -> tuple[float, float, float]:
        base = np.asarray(CAR_COLOURS[int(self.rng.integers(len(CAR_COLOURS)))])
        return tuple(float(v) for v in np.clip(base * (1.0 + self.rng.uniform(-1, 1) * SHADE_JITTER), 0, 1))

    def _add_car(self) -> None:
        mean = 1000.0 / self.density  # [m]
        gap = MIN_GAP + float(self.rng.exponential(max(mean - MIN_GAP, 0.0)))
        self.entries.append((self.entries[-1] if self.entries else ORIGIN) + gap)
        self.colours.append(self._paint())

    def oncoming(self, time: float, ego_s: float) -> list[tuple[int, float]]:
        """(index, progress [m]) of the ``ONCOMING_BODIES`` cars nearest the ego car that are not
        yet ``BEHIND`` it at ``time`` [s] (a pure function of its arguments and the plan)."""
        if not self.density:
            return []
        travelled = self.speed * time
        threshold = ego_s - BEHIND + travelled  # cars whose entry is below it have passed
        while not self.entries or self.entries[-1] < threshold:
            self._add_car()
        first = bisect.bisect_left(self.entries, threshold)
        while len(self.entries) < first + ONCOMING_BODIES:
            self._add_car()
        return [(k, self.entries[k] - travelled) for k in range(first, first + ONCOMING_BODIES)]

    def lead_progress(self, ego_s: float, ego_length: float) -> float:
        """Progress [m] of the lead car's centre: ``lead_gap`` between the bumpers."""
        return ego_s + self.lead_gap + 0.5 * (ego_length + CAR_LENGTH)


def draw_plan(scenery: Scenery, np_random: np.random.Generator) -> TrafficPlan | None:
    """The moving vehicles of an episode of ``scenery``, or None if it has none.

    Draws one number from ``np_random`` (the seed of the plan's own generator) and only when
    the scenery has traffic or a lead car: conditions without them draw exactly what they did.
    """
    if not (scenery.traffic or scenery.lead_gap):
        return None
    rng = np.random.default_rng(int(np_random.integers(2 ** 63)))
    plan = TrafficPlan(density=scenery.traffic, speed=scenery.traffic_speed, lead_gap=scenery.lead_gap, rng=rng)
    if plan.lead_gap:
        plan.lead_colour = plan._paint()
    return plan


class TrafficBodies:
    """The bodies showing one episode's :class:`TrafficPlan` in one PyBullet client."""

    def __init__(self, client, shape: int, plan: TrafficPlan):
        self.client = client
        self.oncoming = [self._body(shape) for _ in range(ONCOMING_BODIES if plan.density else 0)]
        self.lead = self._body(shape) if plan.lead_gap else None
        if self.lead is not None:
            client.changeVisualShape(self.lead, -1, rgbaColor=[*plan.lead_colour, 1.0])
        self.showing = [-1] * len(self.oncoming)  # the car index each oncoming body is painted as

    def _body(self, shape: int) -> int:
        return self.client.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, baseCollisionShapeIndex=-1,
                                           basePosition=HIDDEN)

    @property
    def ids(self) -> tuple[int, ...]:
        return (*self.oncoming, *([self.lead] if self.lead is not None else []))

    def place(self, track: Track, plan: TrafficPlan, time: float, ego_s: float, ego_length: float,
              elevation: Elevation | None = None) -> None:
        """Move every body to where its car is at ``time`` [s] with the ego car at progress ``ego_s`` [m]
        (on a graded road, on its surface: at its height, pitched and rolled with it)."""
        c = self.client
        for index, s in plan.oncoming(time, ego_s):
            slot = index % len(self.oncoming)  # consecutive cars: distinct slots, stable while shown
            body = self.oncoming[slot]
            if self.showing[slot] != index:
                c.changeVisualShape(body, -1, rgbaColor=[*plan.colours[index], 1.0])
                self.showing[slot] = index
            self._put(body, track, s, track.lane_width, math.pi, elevation)  # facing the ego car
        if self.lead is not None:
            self._put(self.lead, track, plan.lead_progress(ego_s, ego_length), 0.0, 0.0, elevation)

    def _put(self, body: int, track: Track, s: float, offset: float, turn: float, elevation) -> None:
        """Place ``body`` at progress ``s`` and ``offset`` [m] left of the centre line, turned by
        ``turn`` [rad] from the road's direction."""
        c = self.client
        x, y, heading = lane_pose(track, s, offset)
        if elevation is None:
            c.resetBasePositionAndOrientation(body, [x, y, 0.0], c.getQuaternionFromEuler([0.0, 0.0, heading + turn]))
            return
        point, roll, pitch = elevation.pose(s, offset, heading + turn)
        c.resetBasePositionAndOrientation(body, [float(v) for v in point], c.getQuaternionFromEuler([roll, pitch, heading + turn]))

    def remove(self) -> None:
        for body in self.ids:
            self.client.removeBody(body)
