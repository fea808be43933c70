"""Backward compatibility against committed reference outputs (``tests/reference/``).

- A tiny cnn-lstm checkpoint written by an earlier steerloop still loads, and stepping it
  frame by frame over committed camera frames gives the committed steering.
- The expert's drive on the short spec track (pose, offsets, steering, camera frames)
  matches the committed trajectory: physics, controllers and rendering have not drifted.
- ``evaluate`` of that checkpoint on a one-scenario suite gives the committed metrics and
  ``results.json`` keeps the committed schema.

A failure here means outputs changed. When the change is deliberate, regenerate the
references with ``python tests/test_reference.py`` and commit them with the change, saying
why in the commit message.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

if __name__ == "__main__":  # run as a script: the repository first, so tests/sim cannot shadow the sim package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import SHORT_SPEC, TINY  # noqa: E402

REFERENCE = Path(__file__).parent / "reference"
CHECKPOINT = REFERENCE / "cnn-lstm-tiny"
EXPERT_DRIVE = REFERENCE / "expert-short.npz"
EVALUATION = REFERENCE / "cnn-lstm-tiny-evaluation.json"
MODEL_STEPS = 12  # frames the checkpoint is stepped over
TRAJECTORY_KEYS = ("x", "y", "yaw", "lateral_offset", "heading_error", "steering", "expert_steering")
SUITE = {"name": "reference", "tracks": ["short.json"], "conditions": ["default"], "speed": 10.0,
         "perturbations": "none", "interventions": True}  # the untrained policy is put back on the lane

pytestmark = pytest.mark.usefixtures("one_thread")


def expert_drive() -> dict[str, np.ndarray]:
    """The expert (``info["expert_steering"]``) on the short spec at tiny resolution, seed 0."""
    from steerloop.sim.env import LaneKeepEnv

    env = LaneKeepEnv(track=SHORT_SPEC, resolution=TINY)
    try:
        obs, info = env.reset(seed=0)
        series = {key: [] for key in TRAJECTORY_KEYS}
        frames = [obs["image"]]
        terminated = False
        while not terminated:
            obs, _, terminated, _, info = env.step(np.array([info["expert_steering"]], np.float32))
            for key in TRAJECTORY_KEYS:
                series[key].append(info[key])
            frames.append(obs["image"])
    finally:
        env.close()
    frames = np.stack(frames)  # (T+1, H, W, 3) uint8
    return {**{key: np.asarray(values, dtype=np.float64) for key, values in series.items()},
            "frame_mean": frames.reshape(len(frames), -1).mean(axis=1),  # (T+1,)
            "frames": frames[:MODEL_STEPS]}  # (MODEL_STEPS, H, W, 3): the model reference's input


def step_policy(policy, frames: np.ndarray) -> np.ndarray:
    """Steering of ``policy`` stepped one frame at a time, recurrent state carried: (T,)."""
    state, steering = None, []
    for t, frame in enumerate(frames):
        action, state = policy.predict({"image": frame[None]}, state=state, episode_start=np.array([t == 0]))
        steering.append(float(action[0, 0]))
    return np.asarray(steering)


def evaluate_reference(out: Path) -> dict:
    """``evaluate`` of the committed checkpoint on the one-scenario reference suite."""
    from steerloop.evaluation.runner import evaluate
    from steerloop.evaluation.suites import load_suite

    out.mkdir(parents=True, exist_ok=True)
    (out / "short.json").write_text(json.dumps(SHORT_SPEC))
    (out / "suite.json").write_text(json.dumps(SUITE))
    suite = load_suite(str(out / "suite.json"))
    return evaluate(str(CHECKPOINT), suite, out / "results", resolution=TINY, progress=False, plots=False)


def _assert_close_tree(actual, expected, path: str = "metrics") -> None:
    """Same keys and types; floats within 1e-6 relative (1e-9 absolute), the rest equal."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), \
            f"{path}: keys {sorted(actual) if isinstance(actual, dict) else actual} != {sorted(expected)}"
        for key in expected:
            _assert_close_tree(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{path}: {actual} != {expected}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_close_tree(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool):
        assert isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9), \
            f"{path}: {actual} != {expected}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def test_committed_checkpoint_loads_and_steps_to_the_committed_steering():
    from steerloop.agents.checkpoint import load_policy_from_checkpoint

    reference = np.load(EXPERT_DRIVE)
    policy = load_policy_from_checkpoint(CHECKPOINT)
    assert policy.config.arch == "cnn-lstm" and policy.recurrent
    np.testing.assert_allclose(step_policy(policy, reference["frames"]), reference["model_steering"], rtol=0,
                               atol=1e-5)


def test_expert_drive_matches_the_committed_trajectory():
    reference = np.load(EXPERT_DRIVE)
    drive = expert_drive()
    assert len(drive["x"]) == len(reference["x"]), "the episode length changed"
    for key in TRAJECTORY_KEYS:
        np.testing.assert_allclose(drive[key], reference[key], rtol=0, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(drive["frame_mean"], reference["frame_mean"], rtol=0, atol=0.05)
    np.testing.assert_array_equal(drive["frames"], reference["frames"])


def test_evaluation_gives_the_committed_metrics_and_schema(tmp_path):
    results = evaluate_reference(tmp_path)
    expected = json.loads(EVALUATION.read_text())
    assert results["schema_version"] == expected["schema_version"]
    assert sorted(results) == expected["results_keys"]
    assert sorted(results["aggregate"]) == expected["aggregate_keys"]
    _assert_close_tree(results["scenarios"][0]["metrics"], expected["metrics"])


def regenerate() -> None:
    """Write every reference file from the current code (run: ``python tests/test_reference.py``)."""
    import shutil
    import tempfile

    import torch

    from steerloop.agents.checkpoint import load_policy_from_checkpoint, save_checkpoint
    from steerloop.agents.models import ModelConfig, build_model
    from steerloop.agents.preprocess import PreprocessConfig

    torch.set_num_threads(1)
    REFERENCE.mkdir(exist_ok=True)
    torch.manual_seed(0)
    config = ModelConfig(arch="cnn-lstm", preprocess=PreprocessConfig(crop_top=4, resize=(12, 32)), hidden=8,
                         feature_dim=16, dropout=0.0)
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    save_checkpoint(CHECKPOINT, build_model(config), config, {"note": "untrained, seed 0: reference outputs"})
    drive = expert_drive()
    drive["model_steering"] = step_policy(load_policy_from_checkpoint(CHECKPOINT), drive["frames"])
    np.savez_compressed(EXPERT_DRIVE, **drive)
    with tempfile.TemporaryDirectory() as tmp:
        results = evaluate_reference(Path(tmp))
    EVALUATION.write_text(json.dumps({
        "schema_version": results["schema_version"], "results_keys": sorted(results),
        "aggregate_keys": sorted(results["aggregate"]), "metrics": results["scenarios"][0]["metrics"],
    }, indent=1, sort_keys=True) + "\n")
    print(f"wrote {CHECKPOINT}, {EXPERT_DRIVE} and {EVALUATION}")


if __name__ == "__main__":
    regenerate()
