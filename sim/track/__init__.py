"""Tracks: road geometry, the JSON spec format, procedural generation and dataset splits.

- :mod:`~steerloop.sim.track.geometry`: :class:`Segment`, :class:`Track` (the centre line and
  lane-frame queries), :class:`LaneState`, the world's limits.
- :mod:`~steerloop.sim.track.spec`: the JSON spec format and its validation.
- :mod:`~steerloop.sim.track.generation`: :func:`generate_track` (seeded procedural routes).
- :mod:`~steerloop.sim.track.splits`: :func:`split_seed` and the train/val/test seed ranges.

The shipped example specs are in ``sim/tracks/`` (:data:`TRACKS_DIR`).
"""

from steerloop.sim.track.generation import generate_track
from steerloop.sim.track.geometry import (
    CLEARANCE_LANE_WIDTHS,
    DEFAULT_LANE_STATE_WINDOW,
    DEFAULT_LANE_WIDTH,
    DEFAULT_TRANSITION_LENGTH,
    MAX_ROUTE_LENGTH,
    MIN_ROUTE_LENGTH,
    SAMPLE_STEP,
    SEGMENT_KINDS,
    WORLD_REACH,
    LaneState,
    Segment,
    Track,
    TrackSpecError,
    check_route_length,
)
from steerloop.sim.track.spec import TRACKS_DIR
from steerloop.sim.track.splits import SPLIT_SEED_RANGES, TEST, TRAIN, VAL, split_seed

__all__ = [
    "TRAIN",
    "VAL",
    "TEST",
    "SPLIT_SEED_RANGES",
    "SAMPLE_STEP",
    "DEFAULT_LANE_WIDTH",
    "DEFAULT_TRANSITION_LENGTH",
    "DEFAULT_LANE_STATE_WINDOW",
    "CLEARANCE_LANE_WIDTHS",
    "SEGMENT_KINDS",
    "TRACKS_DIR",
    "WORLD_REACH",
    "MIN_ROUTE_LENGTH",
    "MAX_ROUTE_LENGTH",
    "check_route_length",
    "split_seed",
    "TrackSpecError",
    "Segment",
    "LaneState",
    "Track",
    "generate_track",
]
