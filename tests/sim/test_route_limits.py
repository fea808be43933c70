"""Route sizes are checked from the spec or the flag, before anything is built: a route
longer than the world allows or too short to finish is refused at once, naming the field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steerloop.sim.env import LaneKeepConfig
from steerloop.sim.track import (MAX_ROUTE_LENGTH, MIN_ROUTE_LENGTH, WORLD_REACH, Track, TrackSpecError,
                                 generate_track)

def _straight_spec(length: float, **extra) -> dict:
    return {"name": "long", "segments": [{"type": "straight", "length": length}], **extra}


@pytest.fixture
def never_built(monkeypatch):
    """Building a road (its knots and samples) fails the test: refusals must come first."""
    def built(*args, **kwargs):
        raise AssertionError("a road was built before the length was checked")

    monkeypatch.setattr(Track, "_build_knots", built)


def test_the_world_limits_agree_with_the_scene():
    from steerloop.sim.scene import GROUND_MARGIN, WORLD_HALF_SIZE

    assert WORLD_REACH == WORLD_HALF_SIZE - GROUND_MARGIN == 2400.0
    assert (MIN_ROUTE_LENGTH, MAX_ROUTE_LENGTH) == (10.0, 4800.0)


@pytest.mark.parametrize("length, words", [(50_000.0, "at most 4800 m"), (1e9, "at most 4800 m"),
                                           (5.0, "at least 10 m")])
def test_a_spec_of_impossible_length_is_refused_before_it_is_built(length, words, never_built):
    with pytest.raises(TrackSpecError, match="segments: must be") as error:
        Track.from_spec(_straight_spec(length), source="long.json")
    assert words in str(error.value) and f"got {length:g}" in str(error.value) and "long.json" in str(error.value)


def test_a_spec_that_leaves_the_world_is_refused_naming_the_segment():
    spec = {"segments": [{"type": "straight", "length": 100}, {"type": "arc", "radius": 50, "angle": 90},
                         {"type": "straight", "length": 3000}]}
    with pytest.raises(TrackSpecError, match=r"segments\[2\]: the road leaves the world .* 2400 m"):
        Track.from_spec(spec)
    with pytest.raises(TrackSpecError, match="start.x: must be within"):
        Track.from_spec(_straight_spec(100, start={"x": 2500, "y": 0}))
    assert Track.from_spec(_straight_spec(10)).length == 10.0  # the shortest route allowed


def test_procedural_lengths_and_the_env_flag_are_checked_first(never_built):
    for make in (lambda: LaneKeepConfig(track_length=1e9), lambda: generate_track(1, length=1e9)):
        with pytest.raises(ValueError, match="must be at most 4800 m"):
            make()
    with pytest.raises(ValueError, match="track_length: must be at least 10 m"):
        LaneKeepConfig(track_length=2.0)


# Runs the command in a fresh process (a regression would climb ~43 MB/s forever: the timeout
# ends it) with track building disabled: a refusal must come before any road is built.
GUARDED_MAIN = """
import sys
from steerloop.sim.track import Track

def built(*args, **kwargs):
    raise SystemExit("a road was built before the length was checked")

Track._build_knots = built
from steerloop.evaluation.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv, words", [
    (["record", "--episodes", "1", "--track-length", "1e9"], "--track-length: must be at most 4800 m"),
    (["record", "--episodes", "1", "--track-length", "5"], "--track-length: must be at least 10 m"),
    (["train-rl", "--timesteps", "64", "--track-length", "1e9"], "--track-length: must be at most 4800 m"),
])
def test_cli_track_length_flags_are_refused_at_once(argv, words, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", GUARDED_MAIN, *argv, "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    err = [line for line in result.stderr.splitlines() if not line.startswith("pybullet build time")]
    assert len(err) == 1 and words in err[0], result.stderr
    assert not out.exists()  # nothing was created


def test_a_50_km_spec_is_refused_by_the_command_line(tmp_path):
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps(_straight_spec(50_000)))
    result = subprocess.run([sys.executable, "-m", "steerloop", "drive", "--track", str(spec), "--resolution",
                             "16x32"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "segments: must be at most 4800 m" in result.stderr and "Traceback" not in result.stderr
