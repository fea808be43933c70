"""Tests for agents.experts and agents.baselines: the SB3 predict contract, DART-style
noisy experts, and the expert bar (the privileged driver must actually drive)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from helpers import TINY

from steerloop.agents import load_policy
from steerloop.agents.baselines import ZerosPolicy
from steerloop.agents.experts import OU_THETA, ExpertPolicy, NoisyExpert
from steerloop.evaluation.metrics import recovery_metrics
from steerloop.sim import ENV_ID
from steerloop.sim.controllers import FEATURE_SIZE, LOOKAHEAD_DISTANCES, LaneFeatures, pure_pursuit, stanley
from steerloop.sim.track import TRACKS_DIR, split_seed
from steerloop.sim.vehicle import VehicleParams
from steerloop.sim.wrappers import Perturbation, PerturbationWrapper

BAR_MEAN_ABS_OFFSET = 0.10  # [m]


def _features(offset: float = 0.0, heading: float = 0.0, speed: float = 10.0) -> np.ndarray:
    """The privileged feature vector of a car on a straight road along +x, its wheelbase
    midpoint ``offset`` left of the centre line, yawed ``heading`` from the road."""
    half = VehicleParams().wheelbase / 2
    c, s = math.cos(heading), math.sin(heading)
    rear_y = offset - half * s
    dx, dy = LOOKAHEAD_DISTANCES, np.full_like(LOOKAHEAD_DISTANCES, -rear_y)  # centre-line points - rear axle
    lookahead = np.c_[c * dx + s * dy, -s * dx + c * dy]  # in the rear-axle frame
    return LaneFeatures(offset=offset, heading_error=heading, front_offset=offset + half * s,
                        front_heading_error=heading, front_curvature=0.0, speed=speed, wheel_angle=0.0,
                        lookahead=lookahead).to_array()


def _batch(n: int, rng=None) -> np.ndarray:
    rng = rng or np.random.default_rng(0)
    return np.stack([_features(o, h) for o, h in zip(rng.uniform(-1, 1, n), rng.uniform(-0.1, 0.1, n))])


# ---------------------------------------------------------------- ExpertPolicy
def test_expert_predict_batched_and_single_shapes():
    expert = ExpertPolicy()
    batch = _batch(5)
    assert batch.shape == (5, FEATURE_SIZE)
    state = object()
    actions, out_state = expert.predict({"privileged": batch}, state=state, episode_start=np.ones(5, bool))
    assert actions.shape == (5, 1) and actions.dtype == np.float32
    assert out_state is state
    single, out_state = expert.predict({"privileged": batch[0]})
    assert single.shape == (1,) and single.dtype == np.float32
    assert out_state is None
    assert single[0] == actions[0, 0]
    assert np.all(np.abs(actions) <= 1.0)


@pytest.mark.parametrize("law, fn", [("stanley", stanley), ("pure_pursuit", pure_pursuit)])
def test_expert_applies_its_law(law, fn):
    expert = ExpertPolicy(law)
    params = VehicleParams()
    batch = _batch(4)
    actions, _ = expert.predict({"privileged": batch})
    for row, action in zip(batch, actions[:, 0]):
        expected = fn(LaneFeatures.from_array(row), params.wheelbase, params.max_wheel_angle)
        assert action == pytest.approx(expected, abs=1e-6)
    # left of the centre line -> steer right, and vice versa
    assert expert.predict({"privileged": _features(offset=0.5)})[0][0] < 0
    assert expert.predict({"privileged": _features(offset=-0.5)})[0][0] > 0


def test_expert_without_privileged_key_explains_how_to_fix():
    expert = ExpertPolicy()
    with pytest.raises(KeyError, match="privileged=True"):
        expert.predict({"image": np.zeros((*TINY, 3), np.uint8), "speed": np.array([10.0], np.float32)})


def test_unknown_expert_law_rejected():
    with pytest.raises(ValueError, match="stanley"):
        ExpertPolicy("mpc")


def test_load_policy_names():
    assert isinstance(load_policy("zeros"), ZerosPolicy)
    assert load_policy("expert:pure_pursuit").law_name == "pure_pursuit"
    with pytest.raises(ValueError, match="unknown policy"):
        load_policy("nope")


# ---------------------------------------------------------------- NoisyExpert
@pytest.mark.parametrize("kind", ["gaussian", "ou"])
def test_noisy_expert_executes_noise_and_keeps_clean_labels(kind):
    expert = ExpertPolicy()
    noisy = NoisyExpert(expert, scale=0.2, kind=kind, seed=3)
    batch = _batch(6)
    state = ("h", "c")
    executed, out_state = noisy.predict({"privileged": batch}, state=state)
    assert out_state is state
    assert executed.shape == (6, 1) and executed.dtype == np.float32
    clean, _ = expert.predict({"privileged": batch})
    assert noisy.last_labels.shape == (6,) and noisy.last_labels.dtype == np.float32
    np.testing.assert_array_equal(noisy.last_labels, clean[:, 0])
    assert np.all(executed[:, 0] != noisy.last_labels)
    assert np.all(np.abs(executed) <= 1.0)
    single, _ = noisy.predict({"privileged": batch[0]})
    assert single.shape == (1,)


@pytest.mark.parametrize("kind", ["gaussian", "ou"])
def test_noisy_expert_same_seed_same_noise(kind):
    batch = {"privileged": _batch(3)}
    runs = []
    for seed in (11, 11, 12):
        noisy = NoisyExpert(ExpertPolicy(), scale=0.1, kind=kind, seed=seed)
        runs.append(np.concatenate([noisy.predict(batch)[0] for _ in range(50)]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_noisy_expert_zero_scale_is_the_expert():
    batch = {"privileged": _batch(4)}
    executed, _ = NoisyExpert(ExpertPolicy(), scale=0.0, kind="ou").predict(batch)
    np.testing.assert_array_equal(executed, ExpertPolicy().predict(batch)[0])


def test_noisy_expert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="noise kind"):
        NoisyExpert(ExpertPolicy(), scale=0.1, kind="pink")
    with pytest.raises(ValueError, match="scale"):
        NoisyExpert(ExpertPolicy(), scale=-0.1)


def _noise_series(kind: str, scale: float, n_envs: int, steps: int, dt: float = 0.05) -> np.ndarray:
    """(steps, n_envs) executed - label on centred states (label 0, far from clipping)."""
    noisy = NoisyExpert(ExpertPolicy(), scale=scale, kind=kind, seed=0, dt=dt)
    obs = {"privileged": np.repeat(_features()[None], n_envs, axis=0)}
    series = []
    for t in range(steps):
        executed, _ = noisy.predict(obs, episode_start=np.full(n_envs, t == 0))
        series.append(executed[:, 0].astype(np.float64) - noisy.last_labels)
    return np.array(series)


def _lag1_autocorrelation(series: np.ndarray) -> float:
    x = series - series.mean(axis=0)
    return float((x[1:] * x[:-1]).sum() / (x * x).sum())


def test_ou_noise_std_and_autocorrelation():
    scale, dt = 0.1, 0.05
    noise = _noise_series("ou", scale, n_envs=64, steps=400, dt=dt)[100:]  # drop the 5 s warm-up from 0
    assert noise.std() == pytest.approx(scale, rel=0.2)
    assert abs(noise.mean()) < 0.3 * scale
    expected = math.exp(-OU_THETA * dt)  # ~0.975
    assert _lag1_autocorrelation(noise) == pytest.approx(expected, abs=0.03)
    # the environments get independent processes
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.5


def test_gaussian_noise_std_and_no_autocorrelation():
    scale = 0.1
    noise = _noise_series("gaussian", scale, n_envs=32, steps=200)
    assert noise.std() == pytest.approx(scale, rel=0.05)
    assert abs(_lag1_autocorrelation(noise)) < 0.05


def test_ou_episode_start_resets_that_environment_only():
    noisy = NoisyExpert(ExpertPolicy(), scale=0.1, kind="ou", seed=0)
    obs = {"privileged": np.repeat(_features()[None], 2, axis=0)}
    for _ in range(100):
        noisy.predict(obs, episode_start=np.array([False, False]))
    before = noisy.ou_state.copy()
    noisy.predict(obs, episode_start=np.array([True, False]))
    decay = math.exp(-OU_THETA * noisy.dt)
    innovation_std = 0.1 * math.sqrt(1 - decay ** 2)
    assert abs(noisy.ou_state[0]) < 5 * innovation_std  # restarted from 0: one innovation only
    assert noisy.ou_state[1] == pytest.approx(decay * before[1], abs=5 * innovation_std)


# ---------------------------------------------------------------- ZerosPolicy
def test_zeros_policy_shapes():
    policy = ZerosPolicy()
    state = object()
    actions, out_state = policy.predict({"image": np.zeros((4, *TINY, 3), np.uint8),
                                         "speed": np.full((4, 1), 10.0, np.float32)}, state=state)
    assert actions.shape == (4, 1) and actions.dtype == np.float32 and not actions.any()
    assert out_state is state
    single, _ = policy.predict({"image": np.zeros((*TINY, 3), np.uint8), "speed": np.array([10.0], np.float32)})
    assert single.shape == (1,) and single.dtype == np.float32 and single[0] == 0.0


# ---------------------------------------------------------------- the expert bar
def _drive(env, policy, *, seed=0, options=None, max_steps=5000):
    obs, info = env.reset(seed=seed, options=options)
    offsets, headings, infos = [], [], []
    for _ in range(max_steps):
        action, _ = policy.predict(obs)
        obs, _, terminated, truncated, info = env.step(action)
        offsets.append(info["lateral_offset"])
        headings.append(info["heading_error"])
        infos.append(info)
        if terminated or truncated:
            break
    return info, np.array(offsets), np.array(headings), infos


def _assert_meets_bar(track, **config):
    env = gym.make(ENV_ID, track=track, resolution=TINY, privileged=True, **config)
    try:
        info, offsets, _, infos = _drive(env, ExpertPolicy())
    finally:
        env.close()
    name = info["track"]
    assert info["success"], f"{name}: expert did not finish (off_road={info['off_road']})"
    assert info["departures"] == 0 and not any(i["departure"] for i in infos), f"{name}: departure"
    assert np.abs(offsets).mean() <= BAR_MEAN_ABS_OFFSET, f"{name}: mean |offset| {np.abs(offsets).mean():.3f} m"
    return offsets


@pytest.mark.parametrize("index", [0, 1, 2])
def test_expert_bar_smoke_procedural(index):
    _assert_meets_bar(split_seed("test", index), track_length=200.0)


def test_expert_bar_smoke_tight_curves():
    _assert_meets_bar(str(TRACKS_DIR / "tight-25m.json"))


@pytest.mark.slow
@pytest.mark.parametrize("track", [split_seed("test", i) for i in range(20)] + ["tight-25m.json", "s-bend.json"])
def test_expert_bar_full(track):
    if isinstance(track, str):
        track = str(TRACKS_DIR / track)
    _assert_meets_bar(track)


@pytest.mark.slow
@pytest.mark.parametrize("perturbation", [
    Perturbation.push(60), Perturbation.push(60, -0.5), Perturbation.kick(60), Perturbation.kick(60, -5.0),
    Perturbation.pulse(60), Perturbation.pulse(60, -0.3)], ids=lambda q: f"{q.kind}{q.magnitude:+g}")
def test_expert_recovers_from_standard_perturbations(perturbation):
    env = PerturbationWrapper(gym.make(ENV_ID, track=split_seed("test", 0), resolution=TINY, privileged=True),
                              [perturbation])
    try:
        info, offsets, _, infos = _drive(env, ExpertPolicy(), max_steps=perturbation.end_step + 200)
        dt = env.unwrapped.dt
    finally:
        env.close()
    assert info["departures"] == 0 and not info["off_road"]
    assert len(offsets) >= perturbation.end_step + 120, "episode ended before the recovery window was over"
    start = perturbation.start_step - 1
    assert all(i["policy_overridden"] for i in infos[start:perturbation.end_step - 1])
    assert np.abs(offsets[start:]).max() > 0.1, "the perturbation should move the car"
    trajectory = {key: np.array([i[key] for i in infos]) for key in ("lateral_offset", "rear_heading_error")}
    (event,) = recovery_metrics(trajectory, [perturbation], dt=dt)  # the definition of docs/metrics.md
    assert event["recovered"], f"not recovered: {event}"
