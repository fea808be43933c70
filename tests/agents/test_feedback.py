"""Fed-back inputs (agents.models, agents.policy): ``prev_steering`` and ``speed`` for every
architecture, Komanda's three fed-back outputs, and proof that the loop is real:

- teacher forcing feeds the logged values, scheduled sampling the model's own outputs,
  past-input dropout zeros (tiny models, exact comparisons);
- in closed loop the fed-back input is the policy's own previous action, kept in its state
  (also in batched lockstep with ``select_state``), and corrupting the expert label and the
  executed command in ``info`` changes nothing in its actions;
- checkpoints without the newer ``inputs`` field load as before; mismatched ones are refused.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from steerloop.agents.checkpoint import CheckpointError, load_checkpoint, load_policy_from_checkpoint, save_checkpoint
from steerloop.agents.models import ARCHS, ModelConfig, build_model
from steerloop.agents.policy import LearnedPolicy
from steerloop.agents.preprocess import PreprocessConfig, preprocess
from steerloop.errors import SteerloopError
from steerloop.evaluation.rollout import rollout_batch
from steerloop.sim.env import LaneKeepEnv
from steerloop.sim.wrappers import InterventionWrapper

from helpers import TINY, straight_spec

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = PreprocessConfig(crop_top=4, resize=(12, 32))
RAW = (16, 32)  # (H, W) [px] of the synthetic camera frames
T = 6  # [steps] of the test windows


def tiny(arch: str, inputs=("image", "prev_steering"), seed: int = 0):
    """An untrained tiny model whose fed-back inputs weigh heavily (so every test of the loop
    sees large effects), in eval mode."""
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, preprocess=SMALL, hidden=8, feature_dim=16, dropout=0.0, inputs=inputs)
    model = build_model(config)
    extra = model.extra_inputs
    with torch.no_grad():
        first = model.head[2] if arch == "pilotnet" else model.lstm
        weight = first.weight if arch == "pilotnet" else first.weight_ih_l0
        weight[:, -extra:] *= 30.0  # the columns of the inputs beside the image
    return model.eval()


def images(batch: int = 2, steps: int = T, seed: int = 0) -> torch.Tensor:
    raw = np.random.default_rng(seed).integers(0, 256, (batch, steps, *RAW, 3), dtype=np.uint8)
    return torch.from_numpy(preprocess(raw, SMALL))


def teacher_for(model, batch: int = 2, steps: int = T, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-0.8, 0.8, (batch, steps, len(model.feedback)))
                            .astype(np.float32))


# ----------------------------------------------------------------------------- configuration
def test_inputs_are_checked_ordered_and_round_trip():
    cfg = ModelConfig(arch="cnn-lstm", inputs=["speed", "image", "prev_steering"])
    assert cfg.inputs == ("image", "prev_steering", "speed") and cfg.feedback == ("steering",)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig(arch="komanda").inputs == ("image", "prev_steering")  # Komanda always feeds back
    assert ModelConfig(arch="komanda").feedback == ("steering", "speed", "throttle")
    assert ModelConfig().feedback == ()
    with pytest.raises(SteerloopError, match=r"unknown input 'prev_steer' \(did you mean 'prev_steering'\?\)"):
        ModelConfig(inputs=("image", "prev_steer"))
    with pytest.raises(SteerloopError, match="must include 'image'"):
        ModelConfig(inputs=("prev_steering",))
    with pytest.raises(SteerloopError, match="twice"):
        ModelConfig(inputs=("image", "speed", "speed"))


@pytest.mark.parametrize("arch", ARCHS)
def test_image_only_models_are_unchanged_and_fed_back_ones_carry_state(arch):
    plain = build_model(ModelConfig(arch=arch, preprocess=SMALL, hidden=8, feature_dim=16))
    fed = build_model(ModelConfig(arch=arch, preprocess=SMALL, hidden=8, feature_dim=16,
                                  inputs=("image", "prev_steering", "speed")))
    assert (plain.initial_state(3) is None) == (arch == "pilotnet") and plain.recurrent == (arch != "pilotnet")
    assert fed.recurrent and fed.initial_state(3)[-1].shape == (3, len(fed.feedback))
    assert len(fed.state_batch_dims) == len(fed.initial_state(3)) and fed.state_batch_dims[-1] == 0
    extra = set(fed.state_dict()) ^ set(plain.state_dict())
    assert not extra, extra  # same tensors, only the first layer after the image features is wider
    widened = [k for k in plain.state_dict() if plain.state_dict()[k].shape != fed.state_dict()[k].shape]
    assert widened == (["head.2.weight"] if arch == "pilotnet" else ["lstm.weight_ih_l0"])


# ----------------------------------------------------------------------------- the window pass
@pytest.mark.parametrize("arch", ARCHS)
def test_stepping_feeds_back_own_outputs_and_equals_the_free_running_window(arch):
    model = tiny(arch, inputs=("image", "prev_steering", "speed"))
    x, speed = images(), torch.tensor([[8.0] * T, [12.0] * T])
    with torch.no_grad():
        window, _ = model.predict_sequence(x, speed=speed)
        state, stepped = model.initial_state(2), []
        for t in range(T):
            steering, state = model.step(x[:, t], state, speed=speed[:, t])
            stepped.append(steering)
            assert torch.equal(state[-1][:, 0], steering)  # the state keeps the model's own output
    torch.testing.assert_close(torch.stack(stepped, 1), window, atol=1e-5, rtol=0)
    with torch.no_grad():  # the speed input is used
        other, _ = model.predict_sequence(x, speed=speed + 5.0)
    assert not torch.allclose(other, window)
    with pytest.raises(ValueError, match="speed"):
        model.predict_sequence(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forcing_feeds_the_logged_values(arch):
    model = tiny(arch)
    x, teacher = images(), teacher_for(model)
    with torch.no_grad():
        forced, _ = model.predict_sequence(x, teacher=teacher)
        changed = teacher.clone()
        changed[:, 3] += 0.5  # the logged value entering step 3
        moved, _ = model.predict_sequence(x, teacher=changed)
        free, _ = model.predict_sequence(x)
    torch.testing.assert_close(moved[:, :3], forced[:, :3], atol=0, rtol=0)  # causal
    assert (moved[:, 3] - forced[:, 3]).abs().min() > 1e-3  # step 3 reads the logged value
    assert (forced - free).abs().max() > 1e-2  # and it is not the model's own output


@pytest.mark.parametrize("arch", ARCHS)
def test_scheduled_sampling_at_probability_one_feeds_the_models_own_outputs(arch):
    model = tiny(arch)
    x, teacher = images(), teacher_for(model)
    with torch.no_grad():
        out, _ = model.outputs(x, None, teacher=teacher, own_probability=1.0)
        changed = teacher.clone()
        changed[:, 1:] = -teacher[:, 1:]
        same, _ = model.outputs(x, None, teacher=changed, own_probability=1.0)
        start = model.initial_state(2)
        start = (*start[:-1], teacher[:, 0])  # what the model "executed" before the window: the logged value
        free, _ = model.predict_sequence(x, start)
    torch.testing.assert_close(same["steering"], out["steering"], atol=0, rtol=0)  # logged values after step 0 unused
    torch.testing.assert_close(out["steering"], free, atol=1e-5, rtol=0)  # = its own outputs fed back


@pytest.mark.parametrize("arch", ("pilotnet", "komanda"))
def test_scheduled_sampling_mixes_own_and_logged_values_reproducibly(arch):
    model = tiny(arch)
    x, teacher = images(batch=8), teacher_for(model, batch=8)
    with torch.no_grad():
        forced = model.outputs(x, None, teacher=teacher)[0]["steering"]
        own = model.outputs(x, None, teacher=teacher, own_probability=1.0)[0]["steering"]
        torch.manual_seed(3)
        mixed = model.outputs(x, None, teacher=teacher, own_probability=0.5)[0]["steering"]
        torch.manual_seed(3)
        again = model.outputs(x, None, teacher=teacher, own_probability=0.5)[0]["steering"]
    torch.testing.assert_close(mixed, again, atol=0, rtol=0)
    later = (slice(None), slice(1, None))
    from_teacher = (mixed[later] - forced[later]).abs() < 1e-6
    from_own = (mixed[later] - own[later]).abs() < 1e-6
    assert from_teacher.any() and (~from_teacher).any() and from_own.any()


@pytest.mark.parametrize("arch", ("cnn-lstm", "komanda"))
def test_past_input_dropout_zeroes_the_fed_back_inputs(arch):
    model = tiny(arch)
    x, teacher = images(), teacher_for(model)
    with torch.no_grad():
        dropped = model.outputs(x, None, teacher=teacher, drop_probability=1.0)[0]["steering"]
        zeros = model.outputs(x, None, teacher=torch.zeros_like(teacher))[0]["steering"]
        kept = model.outputs(x, None, teacher=teacher, drop_probability=0.0)[0]["steering"]
    torch.testing.assert_close(dropped, zeros, atol=0, rtol=0)
    assert (kept - dropped).abs().max() > 1e-3


def _batch(model, steering: torch.Tensor) -> dict:
    b, t = steering.shape
    speed = torch.full((b, t), 10.0)
    batch = {"images": images(b, t), "steering": steering, "speed": speed, "throttle": torch.full((b, t), 0.3)}
    batch.update({f"prev_{k}": torch.roll(batch[k], 1, 1) for k in ("steering", "speed", "throttle")})
    return batch


@pytest.mark.parametrize("arch", ("pilotnet", "cnn-lstm", "komanda"))
def test_training_loss_uses_logged_values_unless_sampling_own(arch):
    model = tiny(arch)
    batch = _batch(model, torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (2, T)).astype(np.float32)))
    changed = dict(batch, prev_steering=batch["prev_steering"] + 0.3)
    with torch.no_grad():
        assert model(batch)[0] != model(changed)[0]  # teacher forcing reads prev_steering
        later = dict(batch, prev_steering=batch["prev_steering"].clone())
        later["prev_steering"][:, 1:] += 0.3
        assert model(batch, own_probability=1.0)[0] == model(later, own_probability=1.0)[0]
        weighted = dict(batch, weight=torch.linspace(0.1, 2.0, 2 * T).view(2, T))
        assert model(weighted)[0] != model(batch)[0]
    with pytest.raises(KeyError, match="prev_steering"):
        model({k: v for k, v in batch.items() if k != "prev_steering"})


# ----------------------------------------------------------------------------- the policy, in closed loop
def _frames(n: int, steps: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (steps, n, *RAW, 3), dtype=np.uint8)


@pytest.mark.parametrize("arch", ("pilotnet", "conv3d-lstm", "komanda"))
def test_policy_keeps_its_own_last_action_through_resets_and_select_state(arch):
    model = tiny(arch, inputs=("image", "prev_steering", "speed"))
    policy = LearnedPolicy(model, model.config)
    frames, speed = _frames(3, 6), np.full((3, 1), 10.0, np.float32)
    state, actions = None, []
    for t in range(4):
        start = np.array([t == 0, t == 0, t in (0, 2)])
        action, state = policy.predict({"image": frames[t], "speed": speed}, state, episode_start=start)
        np.testing.assert_array_equal(state[-1][:, 0], action[:, 0])  # its own action, not a logged one
        actions.append(action)
    kept = policy.select_state(state, np.array([True, False, True]))
    assert kept[-1].shape == (2, len(model.feedback))
    np.testing.assert_array_equal(kept[-1][:, 0], actions[-1][[0, 2], 0])
    with pytest.raises(KeyError, match="speed"):
        policy.predict({"image": frames[0]}, None)


class CorruptInfo(gym.Wrapper):
    """Replaces the expert's label and the executed command in ``info`` by noise."""

    def __init__(self, env, seed: int):
        super().__init__(env)
        self.rng = np.random.default_rng(seed)

    def _corrupt(self, info: dict) -> dict:
        return {**info, "expert_steering": float(self.rng.uniform(-1, 1)), "steering": float(self.rng.uniform(-1, 1))}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, self._corrupt(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._corrupt(info)


class Spy:
    """Records every action and the fed-back state a policy returns; ``override`` replaces the
    fed-back values before each call (to show they matter)."""

    def __init__(self, policy, override: float | None = None):
        self.policy, self.override = policy, override
        self.actions, self.fed = [], []
        self.select_state = policy.select_state
        self.recurrent = True

    def reset(self):
        self.policy.reset()

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        if state is not None and self.override is not None:
            state = (*state[:-1], np.full_like(state[-1], self.override))
        action, state = self.policy.predict(observation, state, episode_start, deterministic)
        self.actions.append(action.copy())
        self.fed.append(state[-1].copy())
        return action, state


@pytest.mark.parametrize("arch", ("cnn-lstm", "komanda"))
def test_closed_loop_feeds_back_the_policy_s_own_actions_never_info(arch):
    model = tiny(arch)
    policy = LearnedPolicy(model, model.config)
    lengths = (25.0, 35.0)  # episodes of different lengths: the batch shrinks through select_state

    def drive(spy, corrupt: bool):
        envs = [LaneKeepEnv(track=straight_spec(length), resolution=TINY) for length in lengths]
        # Interventions put the untrained policy back on the lane: every route is driven to its end.
        wrapped = [InterventionWrapper(env) for env in envs]
        wrapped = [CorruptInfo(env, seed=i) if corrupt else env for i, env in enumerate(wrapped)]
        try:
            rollout_batch(wrapped, spy, seeds=[0, 1])
        finally:
            for env in envs:
                env.close()
        return spy

    clean, corrupted = drive(Spy(policy), False), drive(Spy(policy), True)
    assert len(clean.actions) > 20 and len({len(a) for a in clean.actions}) == 2  # both sizes of batch
    for a, b in zip(clean.actions, corrupted.actions, strict=True):
        np.testing.assert_array_equal(a, b)
    for action, fed in zip(clean.actions, clean.fed):
        np.testing.assert_array_equal(fed[:, 0], action[:, 0])  # the next input is the action just taken
    overridden = drive(Spy(policy, override=0.9), False)  # the loop is real: other fed-back values, other actions
    assert max(np.abs(a - b).max() for a, b in zip(clean.actions[1:], overridden.actions[1:])) > 1e-3


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_without_the_inputs_field_load_as_image_only(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(arch="cnn-lstm", preprocess=SMALL, hidden=8, feature_dim=16)
    model = build_model(config).eval()
    path = save_checkpoint(tmp_path / "old", model, config)
    meta = json.loads((path / "config.json").read_text())
    del meta["model"]["inputs"]  # as written before the field existed
    (path / "config.json").write_text(json.dumps(meta))
    loaded, loaded_config, _ = load_checkpoint(path)
    assert loaded_config.inputs == ("image",)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_sequence(x)[0], model.predict_sequence(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_fed_back_checkpoints_round_trip_and_mismatches_are_refused(arch, tmp_path):
    model = tiny(arch, inputs=("image", "prev_steering", "speed"))
    path = save_checkpoint(tmp_path / arch, model, model.config)
    policy = load_policy_from_checkpoint(path)
    reference = LearnedPolicy(model, model.config)
    frames, speed = _frames(2, 5), np.full((2, 1), 9.0, np.float32)
    state_a = state_b = None
    for t in range(5):
        a, state_a = policy.predict({"image": frames[t], "speed": speed}, state_a, np.array([t == 0] * 2))
        b, state_b = reference.predict({"image": frames[t], "speed": speed}, state_b, np.array([t == 0] * 2))
        np.testing.assert_array_equal(a, b)
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["inputs"] = ["image"] + (["prev_steering"] if arch == "komanda" else [])
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- O(1) stepping, Komanda's layers
@pytest.mark.parametrize("arch", ARCHS)
def test_closed_loop_state_has_a_fixed_size_whatever_the_history(arch):
    """Stepping is O(1) per frame: the state after 40 frames is the same set of tensors, of
    the same shapes, as after one (nothing grows with the episode)."""
    model = tiny(arch, inputs=("image", "prev_steering", "speed"))
    x = images(batch=1, steps=40)
    state = model.initial_state(1)
    shapes = None
    with torch.no_grad():
        for t in range(40):
            _, state = model.step(x[:, t], state, speed=torch.tensor([10.0]))
            shapes = shapes or [tuple(s.shape) for s in state]
            assert [tuple(s.shape) for s in state] == shapes


def test_komanda_single_step_rnn_equals_nn_rnn_and_feeds_back_three_outputs():
    model = tiny("komanda")
    y = torch.randn(3, 1, model.config.hidden)
    r = torch.randn(1, 3, model.config.hidden)
    with torch.no_grad():
        z, r1 = model._run_rnn(y, r)
        z_ref, r_ref = model.rnn(y, r)
        torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(r1, r_ref, atol=1e-6, rtol=0)
        out, state = model.outputs(images(batch=3, steps=1), None)
    assert set(out) == {"steering", "speed", "throttle"} and state[-1].shape == (3, 3)
    torch.testing.assert_close(state[-1], torch.stack([out["steering"], out["speed"], out["throttle"]], -1)[:, 0])


@pytest.mark.slow  # ~6 s
def test_komanda_drives_through_evaluate_like_any_checkpoint(tmp_path):
    """`steerloop evaluate` of a komanda checkpoint (three fed-back outputs and the speed
    input): the same code path as every checkpoint, results bit-identical with 1 and 2 workers."""
    from helpers import SHORT_SPEC

    from steerloop.evaluation.runner import evaluate
    from steerloop.evaluation.suites import load_suite

    model = tiny("komanda", inputs=("image", "speed"))
    path = save_checkpoint(tmp_path / "komanda", model, model.config)
    (tmp_path / "short.json").write_text(json.dumps(SHORT_SPEC))
    (tmp_path / "suite.json").write_text(json.dumps({
        "name": "two", "tracks": ["short.json"], "conditions": ["default", "dusk"], "speed": 10.0,
        "perturbations": "none", "interventions": True}))
    suite = load_suite(str(tmp_path / "suite.json"))
    one = evaluate(str(path), suite, tmp_path / "w1", resolution=RAW, progress=False, plots=False, batch=1)
    two = evaluate(str(path), suite, tmp_path / "w2", resolution=RAW, progress=False, plots=False, batch=1, workers=2)
    assert one["policy"]["fed_back"] == list(model.feedback) and one["aggregate"]["scenarios"] == 2
    assert [s["metrics"] for s in one["scenarios"]] == [s["metrics"] for s in two["scenarios"]]
