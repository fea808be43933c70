"""Resetting the simulator to logged states and the short closed-loop rollouts from them
(evaluation.short_loop, ``steerloop offline --rollouts K``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from steerloop.agents.spec import policy_ref
from steerloop.driving_log import DrivingLog
from steerloop.evaluation.cli import main
from steerloop.evaluation.offline import balanced_mae, evaluate_offline
from steerloop.evaluation.short_loop import (ShortLoopConfig, env_for_log, logged_start, rollout_from, sample_states,
                                             short_loop)

from helpers import record_short_log

pytestmark = pytest.mark.usefixtures("one_thread")

# A recurrent user policy: steers by the image's left/right brightness difference plus a decaying
# memory of its own previous outputs, so what it saw during the warm-up changes what it does.
DRIVER = '''
import numpy as np
from steerloop import PolicyBase


class Memory(PolicyBase):
    def __init__(self, gain=4.0):
        self.gain, self.seen = gain, []

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        image = observation["image"].astype(np.float32) / 255.0
        n, width = len(image), image.shape[2]
        self.seen.append(observation["image"][0].copy())
        memory = np.zeros(n, np.float32) if state is None else state
        memory = np.where(np.asarray(episode_start, bool), 0.0, memory).astype(np.float32)
        drive = self.gain * (image[:, :, : width // 2].mean(axis=(1, 2, 3)) - image[:, :, width // 2:].mean(axis=(1, 2, 3)))
        action = np.clip(0.5 * memory + drive, -1.0, 1.0).astype(np.float32)
        return action[:, None], action


def load(gain=4.0):
    return Memory(gain)
'''


@pytest.fixture(scope="module")
def noisy_log(tmp_path_factory) -> str:
    """2 DART-noisy expert episodes on the short spec (~150 steps each): off-centre states."""
    return record_short_log(tmp_path_factory.mktemp("short-loop"), 2, noise=0.3, noise_kind="ou")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("user") / "driver.py"
    path.write_text(DRIVER)
    return f"{path}:load"


def test_reset_to_a_logged_state_reproduces_it(noisy_log):
    log = DrivingLog(noisy_log)
    env = env_for_log(log)
    worst_offset = worst_heading = 0.0
    for index in log.episodes:
        data = log.read_episode(index, cameras=["center"])
        attrs = log.episode_attrs(index)
        assert np.abs(data["lateral_offset"]).max() > 0.1  # the noise put the car off centre
        for t in range(1, log.episode_length(index) - 20, 7):
            obs, info = env.reset(seed=int(attrs["seed"]), options={"track": attrs["track_spec"],
                                                                    "condition": attrs["condition"],
                                                                    **logged_start(data, t)})
            worst_offset = max(worst_offset, abs(info["lateral_offset"] - data["lateral_offset"][t]))
            worst_heading = max(worst_heading, abs(info["heading_error"] - data["heading_error"][t]))
            assert info["progress"] == pytest.approx(data["progress"][t], abs=1e-6)
            assert info["speed"] == pytest.approx(data["speed"][t], abs=1e-3)
            assert info["wheel_angle"] == pytest.approx(data["wheel_angle"][t], abs=1e-6)
            assert info["expert_steering"] == pytest.approx(data["expert_steering"][t], abs=1e-4)
    env.close()
    log.close()
    assert worst_offset < 0.01  # [m]: 1 cm
    assert worst_heading < math.radians(0.1)


def test_the_pending_command_is_the_one_executed_before(noisy_log):
    """The steering delay line holds step t-1's command: one step from the reset state with
    the logged command t lands where the log went (to within the suspension's transient)."""
    log = DrivingLog(noisy_log)
    env = env_for_log(log)
    data = log.read_episode(log.episodes[0], cameras=[])
    attrs = log.episode_attrs(log.episodes[0])
    t = 60
    env.reset(seed=int(attrs["seed"]), options={"track": attrs["track_spec"], "condition": attrs["condition"],
                                                 **logged_start(data, t)})
    _, _, _, _, info = env.step(np.array([data["steering"][t]], np.float32))
    assert info["wheel_angle"] == pytest.approx(data["wheel_angle"][t + 1], abs=1e-6)
    assert info["lateral_offset"] == pytest.approx(data["lateral_offset"][t + 1], abs=0.01)
    env.close()
    log.close()


@pytest.mark.parametrize("option, value, named", [
    ("start_offset", 3.0, "start_offset=3.0 m is outside [-2.5, 2.5] (off the road"),
    ("start_heading", 2.0, "start_heading=2.0 rad"),
    ("start_speed", float("nan"), "start_speed=nan"),
    ("start_wheel_angle", 0.9, "start_wheel_angle=0.9 rad"),
    ("start_command", "left", "start_command must be a number"),
    ("start_s", 1e4, "start_s=10000.0 m is at or past the end of the route"),
])
def test_a_bad_start_state_is_refused_naming_the_option(make_env, option, value, named):
    env = make_env().unwrapped
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace("[", r"\[")):
        env.reset(seed=0, options={option: value})


def test_balanced_mae_by_hand():
    labels = np.array([0.0, 0.0, 0.0, 0.5])  # three straight frames, one large command
    predictions = np.array([0.01, 0.01, 0.01, 0.1])
    value, bins = balanced_mae(predictions, labels)
    assert value == pytest.approx((0.01 + 0.4) / 2)  # the mean over the two non-empty bins
    assert [b["frames"] for b in bins] == [3, 0, 0, 0, 1] and bins[1]["mae"] is None
    assert np.mean(np.abs(predictions - labels)) == pytest.approx(0.1075)  # the plain MAE hides the miss


def test_warm_up_feeds_the_logged_frames_then_the_policy_drives(noisy_log, driver):
    cfg = ShortLoopConfig(rollouts=1, horizon=1.0, warmup=0.5)
    ref = policy_ref(driver, None, None)
    policy = ref.load()
    log = DrivingLog(noisy_log)
    env = env_for_log(log)
    (index, t), = sample_states(log, cfg, env.dt)
    result = rollout_from(policy, env, log, index, t, cfg, name=ref.name)
    frames = log.read_episode(index, cameras=["center"])["frames/center"]
    assert len(policy.seen) == 10 + 20  # 0.5 s of logged frames, then 1 s driving at 20 Hz
    for k in range(10):
        np.testing.assert_array_equal(policy.seen[k], frames[t - 10 + k])
    assert result["steps"] == 20 and result["reset_offset_error_m"] < 1e-6
    env.close()
    log.close()


def test_short_loop_is_identical_for_any_worker_count_and_scored(noisy_log, driver):
    cfg = ShortLoopConfig(rollouts=5, horizon=2.0, warmup=0.5, seed=3)
    one = short_loop(policy_ref(driver, {"gain": 6.0}, None), noisy_log, cfg, workers=1)
    two = short_loop(policy_ref(driver, {"gain": 6.0}, None), noisy_log, cfg, workers=2)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert one["rollouts"] == 5 and len(one["per_rollout"]) == 5
    rollouts = one["per_rollout"]
    assert one["departure_rate"] == pytest.approx(np.mean([r["departed"] for r in rollouts]))
    assert one["final_abs_offset_m"] == pytest.approx(np.mean([r["final_abs_offset_m"] for r in rollouts]))
    assert one["steps"] == sum(r["steps"] for r in rollouts) <= 5 * 40
    other_seed = short_loop(policy_ref(driver, {"gain": 6.0}, None), noisy_log, ShortLoopConfig(5, 2.0, 0.5, seed=4))
    assert [(r["episode"], r["step"]) for r in other_seed["per_rollout"]] != [(r["episode"], r["step"])
                                                                              for r in rollouts]


def test_zeros_departs_where_the_expert_would_not(noisy_log):
    """All-zeros from states on the 25 m arc leaves the lane within 3 s: the short loop sees
    what offline RMSE calls a small error."""
    result = evaluate_offline("zeros", noisy_log, short=ShortLoopConfig(rollouts=8, horizon=3.0, warmup=0.0))
    assert result["short_loop"]["departure_rate"] > 0.0
    assert result["short_loop"]["on_policy_rmse"] > result["model"]["rmse"]


@pytest.mark.parametrize("flags, message", [
    (["--horizon", "0"], "horizon must be > 0 s, got 0.0"),
    (["--horizon", "60"], "horizon 60.0 s plus warmup 1.0 s is longer than the episodes of"),
    (["--rollouts", "100000"], "rollouts=100000 is more than the"),
    (["--warmup", "-1"], "warmup must be >= 0 s, got -1.0"),
])
def test_bad_short_loop_settings_are_one_line_errors(noisy_log, flags, message, capsys):
    assert main(["offline", "--policy", "zeros", "--data", noisy_log, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_offline_cli_prints_the_short_loop(noisy_log, tmp_path, capsys):
    out = tmp_path / "offline.json"
    assert main(["offline", "--policy", "zeros", "--data", noisy_log, "--rollouts", "3", "--horizon", "1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "short closed loop: 3 rollouts of 1 s" in text and "balanced_mae" in text
    saved = json.loads(out.read_text())
    assert saved["short_loop"]["rollouts"] == 3 and len(saved["steering_bins"]) == 5


def test_states_off_the_road_are_never_sampled():
    """A learner's DAgger log can leave the road; the car is never restarted there."""
    class Log:
        path, episodes = "fake-log", [0]

        def episode_length(self, index):
            return 100

        def read_episode(self, index, cameras=()):
            offset = np.zeros(100, np.float32)
            offset[50:] = 3.0  # off the road (beyond 2.5 m) from step 50 on
            return {"lateral_offset": offset}

    cfg = ShortLoopConfig(rollouts=30, horizon=0.5, warmup=0.5)
    states = sample_states(Log(), cfg, 0.05)
    assert len(states) == 30 and all(10 <= t < 50 for _, t in states)
    with pytest.raises(Exception, match="rollouts=41 is more than the 40 logged states"):
        sample_states(Log(), ShortLoopConfig(rollouts=41, horizon=0.5, warmup=0.5), 0.05)
