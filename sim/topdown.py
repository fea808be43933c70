"""A top-down map of a route with the car and its trail, drawn with OpenCV (fast enough per frame)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from steerloop.sim.track import Track
from steerloop.sim.vehicle import VehicleParams

BACKGROUND = (60, 110, 50)  # RGB
ROAD = (90, 90, 95)
EDGE = (235, 235, 235)
TRAIL = (255, 200, 0)
CAR = (220, 30, 30)
MARGIN = 12  # [px]


def _transform(track: Track, size: int):
    """World (x, y) -> pixel (u, v), fitting the whole route with the y axis pointing up."""
    lo = np.array([track.x.min(), track.y.min()]) - track.lane_width * 2
    hi = np.array([track.x.max(), track.y.max()]) + track.lane_width * 2
    scale = (size - 2 * MARGIN) / float(max(hi - lo))
    centre = (lo + hi) / 2

    def to_px(x, y):
        u = (np.asarray(x) - centre[0]) * scale + size / 2
        v = size / 2 - (np.asarray(y) - centre[1]) * scale
        return np.stack([u, v], axis=-1)

    return to_px, scale


def draw_top_down(track: Track, pose, trail, params: VehicleParams, size: int = 320) -> np.ndarray:
    """(size, size, 3) uint8 RGB: road, lane edges, the car's trail and the car itself."""
    image = np.full((size, size, 3), BACKGROUND, np.uint8)
    to_px, scale = _transform(track, size)
    s = np.linspace(0.0, track.length, max(int(track.length), 2))
    lane = track.lane_width
    for offset, colour, width in ((0.5 * lane, ROAD, max(int(2 * lane * scale), 1)),
                                  (-0.5 * lane, EDGE, 1), (1.5 * lane, EDGE, 1)):
        pts = to_px(*track.lateral_points(s, offset))
        cv2.polylines(image, [np.round(pts * 4).astype(np.int32)], False, colour, width, cv2.LINE_AA, shift=2)
    if len(trail) > 1:
        pts = to_px(*np.asarray(trail).T)
        cv2.polylines(image, [np.round(pts * 4).astype(np.int32)], False, TRAIL, 1, cv2.LINE_AA, shift=2)
    x, y, yaw = pose
    c, s_ = math.cos(yaw), math.sin(yaw)
    half_l, half_w = params.body_length / 2, params.body_width / 2
    corners = np.array([[half_l, half_w], [half_l, -half_w], [-half_l, -half_w], [-half_l, half_w]])
    world = np.c_[x + c * corners[:, 0] - s_ * corners[:, 1], y + s_ * corners[:, 0] + c * corners[:, 1]]
    car = to_px(world[:, 0], world[:, 1])
    cv2.fillPoly(image, [np.round(car * 4).astype(np.int32)], CAR, cv2.LINE_AA, shift=2)
    centre = to_px(x, y)
    cv2.circle(image, tuple(int(v) for v in np.round(centre)), 4, CAR, 1, cv2.LINE_AA)
    return image
