"""Privileged lateral controllers on the true lane geometry.

These are the control laws behind the expert drivers. They live in ``sim`` because the
environment reports the expert's command for every state in ``info["expert_steering"]``
and the perturbation wrapper uses them to script lateral pushes; ``agents.experts``
wraps them in the stable-baselines3 ``predict`` contract.

Both laws read a :class:`LaneFeatures` vector, which the environment computes from the
track and the car's pose (and exposes as ``observation["privileged"]`` when created
with ``privileged=True``). Outputs are normalised steering commands in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Layout of the privileged feature vector.
LOOKAHEAD_DISTANCES = np.arange(1.0, 31.0, 1.0)  # [m] along the road from the rear axle's projection
N_SCALARS = 7
FEATURE_SIZE = N_SCALARS + 2 * len(LOOKAHEAD_DISTANCES)


@dataclass(frozen=True)
class LaneFeatures:
    """The privileged state a controller needs, all in SI units."""

    offset: float  # [m] lateral offset of the wheelbase midpoint, + = left
    heading_error: float  # [rad] car yaw - road heading at the midpoint
    front_offset: float  # [m] lateral offset of the front axle centre
    front_heading_error: float  # [rad] car yaw - road heading at the front axle's projection
    front_curvature: float  # [1/m] road curvature at the front axle's projection
    speed: float  # [m/s]
    wheel_angle: float  # [rad] current road-wheel angle
    lookahead: np.ndarray | None  # (K, 2) centre-line points at LOOKAHEAD_DISTANCES, rear-axle frame
    # (x forward, y left); None when the environment was not asked for them

    def to_array(self) -> np.ndarray:
        if self.lookahead is None:
            raise ValueError("lookahead points were not computed: create the env with privileged=True")
        head = [self.offset, self.heading_error, self.front_offset, self.front_heading_error,
                self.front_curvature, self.speed, self.wheel_angle]
        return np.concatenate([np.asarray(head, np.float64), self.lookahead.reshape(-1)]).astype(np.float32)

    @classmethod
    def from_array(cls, array) -> LaneFeatures:
        a = np.asarray(array, dtype=np.float64).reshape(-1)
        if a.shape != (FEATURE_SIZE,):
            raise ValueError(f"privileged feature vector must have {FEATURE_SIZE} values, got shape {a.shape}; "
                             "create the env with privileged=True and pass observation['privileged']")
        return cls(*a[:N_SCALARS], lookahead=a[N_SCALARS:].reshape(-1, 2))


# Stanley (Hoffmann et al. 2007), referenced at the front axle. Kinematically it needs no
# curvature feed-forward: on the path, the front wheel's heading error equals the wheel angle.
STANLEY_K = 1.5  # [1/s] cross-track gain: atan(K * e / v)
STANLEY_SOFT_SPEED = 1.0  # [m/s] keeps the cross-track term bounded at low speed
STANLEY_HEADING_GAIN = 1.0  # [-] weight of the heading-error term
# Pure pursuit (Coulter 1992) from the rear axle.
PURE_PURSUIT_LOOKAHEAD_TIME = 0.6  # [s] lookahead distance grows with speed ...
PURE_PURSUIT_MIN_LOOKAHEAD = 4.0  # [m] ... from this minimum
PURE_PURSUIT_MAX_LOOKAHEAD = float(LOOKAHEAD_DISTANCES[-1])  # [m]


def stanley(features: LaneFeatures, wheelbase: float, max_wheel_angle: float,
            target_offset: float = 0.0) -> float:
    """Stanley steering that drives the front axle onto the line ``target_offset`` left of centre.

    ``front_curvature`` is unused by this law (kept in the features for other controllers).
    """
    cross_track = features.front_offset - target_offset
    delta = (-STANLEY_HEADING_GAIN * features.front_heading_error
             - math.atan2(STANLEY_K * cross_track, features.speed + STANLEY_SOFT_SPEED))
    return min(max(delta / max_wheel_angle, -1.0), 1.0)


def pure_pursuit(features: LaneFeatures, wheelbase: float, max_wheel_angle: float,
                 target_offset: float = 0.0) -> float:
    """Pure pursuit towards the centre-line point one lookahead distance ahead."""
    if features.lookahead is None:
        raise ValueError("pure pursuit needs the lookahead points: create the env with privileged=True")
    lookahead = min(max(PURE_PURSUIT_LOOKAHEAD_TIME * features.speed, PURE_PURSUIT_MIN_LOOKAHEAD),
                    PURE_PURSUIT_MAX_LOOKAHEAD)
    x = np.interp(lookahead, LOOKAHEAD_DISTANCES, features.lookahead[:, 0])
    y = np.interp(lookahead, LOOKAHEAD_DISTANCES, features.lookahead[:, 1]) + target_offset
    alpha = math.atan2(y, x)
    delta = math.atan2(2.0 * wheelbase * math.sin(alpha), math.hypot(x, y))
    return min(max(delta / max_wheel_angle, -1.0), 1.0)


CONTROLLERS = {"stanley": stanley, "pure_pursuit": pure_pursuit}
DEFAULT_EXPERT = "stanley"
