"""Tests for agents.preprocess, agents.models and agents.policy: preprocessing, the shared
model interface, overfitting a tiny synthetic task, and stateful equivalence (stepping
frame by frame == the window pass, also through LearnedPolicy with episode resets)."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch

from steerloop.agents.models import ARCHS, ModelConfig, build_model, count_parameters
from steerloop.agents.policy import LearnedPolicy
from steerloop.agents.preprocess import PreprocessConfig, preprocess

RAW = (24, 48)  # (H, W) [px] of the synthetic raw camera frames
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = PreprocessConfig(crop_top=4, crop_bottom=0, resize=(20, 40))
RECURRENT = ("cnn-lstm", "conv3d-lstm", "komanda", "chauffeur")



def small_config(arch: str, **kwargs) -> ModelConfig:
    return ModelConfig(arch=arch, preprocess=SMALL, hidden=16, feature_dim=32, **kwargs)


def bar_frames(columns: np.ndarray) -> np.ndarray:
    """uint8 frames (N, H, W, 3): dark road, a bright 4 px vertical bar starting at each column."""
    frames = np.full((len(columns), *RAW, 3), 40, np.uint8)
    for frame, col in zip(frames, columns):
        frame[:, col:col + 4] = (230, 200, 60)
    return frames


def random_frames(rng: np.random.Generator, *lead: int) -> np.ndarray:
    return rng.integers(0, 256, (*lead, *RAW, 3), dtype=np.uint8)


def to_tensor(frames: np.ndarray, config: PreprocessConfig = SMALL) -> torch.Tensor:
    return torch.from_numpy(preprocess(frames, config))


# ---------------------------------------------------------------------------------- preprocess


def test_preprocess_shape_dtype_range():
    frames = random_frames(np.random.default_rng(0), 2, 3)  # (B, T, H, W, 3)
    x = preprocess(frames, SMALL)
    assert x.shape == (2, 3, 3, 20, 40) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert preprocess(frames[0, 0], SMALL).shape == (3, 20, 40)  # a single frame
    np.testing.assert_array_equal(preprocess(frames[1, 2], SMALL), x[1, 2])  # frames independent
    assert PreprocessConfig().output_shape == (3, 66, 200)


def test_preprocess_yuv_equals_cv2_and_rgb_is_plain_normalisation():
    frame = random_frames(np.random.default_rng(1), 1)[0]
    identity = dict(crop_top=0, crop_bottom=0, resize=RAW)
    yuv = preprocess(frame, PreprocessConfig(**identity, colour_space="yuv"))
    expected = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(yuv.transpose(1, 2, 0), expected, atol=1e-6)
    rgb = preprocess(frame, PreprocessConfig(**identity, colour_space="rgb"))
    np.testing.assert_allclose(rgb.transpose(1, 2, 0), frame / 127.5 - 1.0, atol=1e-6)


def test_preprocess_crops_top_and_bottom_then_resizes():
    frame = np.zeros((*RAW, 3), np.uint8)
    frame[:4] = 255  # "sky"
    frame[-2:] = 255  # "bonnet"
    cfg = PreprocessConfig(crop_top=4, crop_bottom=2, resize=(18, 48), colour_space="rgb")
    np.testing.assert_array_equal(preprocess(frame, cfg), -1.0)  # only the black rows remain
    frame = random_frames(np.random.default_rng(2), 1)[0]
    cfg = PreprocessConfig(crop_top=4, crop_bottom=2, resize=(9, 24), colour_space="rgb")
    expected = cv2.resize(np.ascontiguousarray(frame[4:-2]), (24, 9), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(preprocess(frame, cfg).transpose(1, 2, 0), expected / 127.5 - 1.0, atol=1e-6)


def test_preprocess_rejects_bad_input_with_clear_messages():
    frame = np.zeros((*RAW, 3), np.float32)
    with pytest.raises(TypeError, match=r"uint8.*float32.*\(24, 48, 3\)"):
        preprocess(frame, SMALL)
    with pytest.raises(ValueError, match=r"\(24, 48, 4\)"):
        preprocess(np.zeros((*RAW, 4), np.uint8), SMALL)
    with pytest.raises(ValueError, match=r"leaves 4 rows.*>= 8"):
        preprocess(np.zeros((*RAW, 3), np.uint8), PreprocessConfig(crop_top=12, crop_bottom=8, resize=(20, 40)))


def test_preprocess_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="colour_space"):
        PreprocessConfig(colour_space="hsv")
    with pytest.raises(ValueError, match="crop_top"):
        PreprocessConfig(crop_top=-1)
    with pytest.raises(ValueError, match="resize"):
        PreprocessConfig(resize=(4, 200))
    assert PreprocessConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    with pytest.raises(ValueError, match=r"preprocess config: unknown key 'crop_left'"):
        PreprocessConfig.from_dict({**SMALL.to_dict(), "crop_left": 3})


# ---------------------------------------------------------------------------------- config


def test_model_config_round_trip_and_rejections():
    cfg = small_config("conv3d-lstm", frame_stack=3)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown key 'hiden' \(did you mean 'hidden'\?\)"):
        ModelConfig.from_dict({**cfg.to_dict(), "hiden": 3})
    with pytest.raises(ValueError, match=r"unknown arch 'transformer'.*pilotnet"):
        ModelConfig.from_dict({**cfg.to_dict(), "arch": "transformer"})
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig(hidden=0)


# ---------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_returns_finite_loss_and_metrics(arch):
    torch.manual_seed(0)
    model = build_model(small_config(arch))
    b, t = 2, 5
    batch = {"images": torch.randn(b, t, *SMALL.output_shape), "steering": torch.rand(b, t) * 2 - 1,
             "speed": torch.full((b, t), 10.0), "throttle": torch.rand(b, t),
             "mask": torch.tensor([[True] * t, [True, True, False, False, False]])}
    batch.update({f"prev_{k}": torch.roll(batch[k], 1, 1) for k in ("steering", "speed", "throttle")})
    loss, metrics = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    expected = {"loss", "steering_mse", "steering_mae"}
    if arch in ("conv3d-lstm", "komanda"):
        expected |= {"speed_mse", "throttle_mse"}
    assert set(metrics) == expected
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert metrics["loss"] == pytest.approx(loss.item())
    loss.backward()
    # masked frames do not contribute: changing their labels leaves the loss unchanged
    model.eval()
    ref, _ = model(batch)
    batch["steering"][1, 2:] += 0.5
    assert model(batch)[0].item() == pytest.approx(ref.item())
    steering, _ = model.predict_sequence(batch["images"])
    assert steering.shape == (b, t) and steering.abs().max() <= 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_models_accept_single_frame_windows_and_reject_wrong_sizes(arch):
    model = build_model(small_config(arch)).eval()
    steering, _ = model.predict_sequence(torch.zeros(3, 1, *SMALL.output_shape))
    assert steering.shape == (3, 1)
    with pytest.raises(ValueError, match=r"\(3, 20, 40\).*got \(3, 1, 3, 66, 200\)"):
        model.predict_sequence(torch.zeros(3, 1, 3, 66, 200))
    with pytest.raises(KeyError, match="steering"):
        model({"images": torch.zeros(1, 2, *SMALL.output_shape)})


def test_nominal_input_parameter_counts_are_small():
    counts = {arch: count_parameters(build_model(ModelConfig(arch=arch))) for arch in ARCHS}
    assert 200_000 < counts["pilotnet"] < 300_000  # 1152-wide flatten at 66x200, as NVIDIA's
    assert all(c < 500_000 for c in counts.values()), counts


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_tiny_synthetic_dataset(arch):
    """Steering = horizontal position of a bright bar; 2 sequences of 8 frames in which the bar
    drifts a few pixels per frame (consecutive frames are correlated, as when driving)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    drift = np.cumsum(rng.integers(-3, 4, (2, 8)), axis=1)
    columns = np.clip(rng.integers(8, RAW[1] - 12, (2, 1)) + drift, 0, RAW[1] - 4)  # (B, T) [px]
    steering = (columns - (RAW[1] - 4) / 2) / ((RAW[1] - 4) / 2) * 0.8
    batch = {"images": to_tensor(bar_frames(columns.reshape(-1))).view(2, 8, *SMALL.output_shape),
             "steering": torch.tensor(steering, dtype=torch.float32),
             "speed": torch.tensor([[8.0] * 8, [12.0] * 8]),
             "throttle": torch.tensor(columns / RAW[1], dtype=torch.float32)}
    batch.update({f"prev_{k}": torch.roll(batch[k], 1, 1) for k in ("steering", "speed", "throttle")})
    model = build_model(small_config(arch, dropout=0.0))
    if arch == "chauffeur":  # its encoder is frozen: overfitting needs a trained one
        model.encoder.requires_grad_(True)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    initial = model(batch)[1]["loss"]
    for _ in range(300):
        loss, metrics = model(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    final = model(batch)[1]
    assert final["loss"] < 0.1 * initial, (initial, final)
    assert final["steering_mse"] < 0.1 * float(batch["steering"].var())


@pytest.mark.parametrize("arch", RECURRENT)
def test_step_by_step_equals_window_pass(arch):
    torch.manual_seed(0)
    model = build_model(small_config(arch)).eval()
    images = torch.randn(2, 9, *SMALL.output_shape)  # (B, T, 3, h, w)
    with torch.no_grad():
        window, final = model.predict_sequence(images)
        state = model.initial_state(2)
        stepped = []
        for t in range(images.shape[1]):
            s, state = model.step(images[:, t], state)
            stepped.append(s)
        # a window split in two, carrying the state, equals the whole window too
        first, mid = model.predict_sequence(images[:, :4])
        second, _ = model.predict_sequence(images[:, 4:], mid)
    torch.testing.assert_close(torch.stack(stepped, 1), window, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([first, second], 1), window, atol=1e-5, rtol=0)
    for a, b in zip(state, final):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_single_step_lstm_equals_nn_lstm(layers):
    """The written-out closed-loop LSTM step gives nn.LSTM's output and state."""
    torch.manual_seed(0)
    model = build_model(small_config("cnn-lstm", lstm_layers=layers)).eval()
    features = torch.randn(3, 1, model.config.feature_dim)  # (B, 1, F)
    state = tuple(torch.randn(layers, 3, model.config.hidden) for _ in range(2))
    with torch.no_grad():
        y, (h, c) = model._run_lstm(features, state)
        y_ref, (h_ref, c_ref) = model.lstm(features, state)
    for got, want in ((y, y_ref), (h, h_ref), (c, c_ref)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_conv3d_output_depends_only_on_current_stack():
    """Output t sees frames t-frame_stack+1..t (through the 3D conv) and earlier ones only via the LSTM;
    the first frames are padded with copies of frame 0, not zeros."""
    torch.manual_seed(0)
    model = build_model(small_config("conv3d-lstm", frame_stack=3)).eval()
    images = torch.randn(1, 6, *SMALL.output_shape)
    with torch.no_grad():
        ref, _ = model.predict_sequence(images)
        future = images.clone()
        future[:, 4:] += 1.0
        changed, _ = model.predict_sequence(future)
        padded, _ = model.predict_sequence(torch.cat([images[:, :1].expand(1, 2, *SMALL.output_shape),
                                                      images[:, :1]], 1))
        state = model.initial_state(1)
        state = (state[0], state[1], images[:, :1].expand(1, 2, *SMALL.output_shape).clone(), torch.ones(1))
        explicit, _ = model.predict_sequence(images[:, :1], state)
    torch.testing.assert_close(changed[:, :4], ref[:, :4])  # causal
    torch.testing.assert_close(explicit[:, 0], ref[:, 0], atol=1e-6, rtol=0)  # first-frame padding
    assert padded.shape == (1, 3)


# ---------------------------------------------------------------------------------- policy


def _episodes(starts: np.ndarray) -> list[tuple[int, int]]:
    """[begin, end) of each episode for a 1-D episode_start pattern (index 0 always starts one)."""
    begins = [0] + [i for i in range(1, len(starts)) if starts[i]]
    return list(zip(begins, begins[1:] + [len(starts)]))


@pytest.mark.parametrize("arch", RECURRENT)
def test_policy_with_episode_resets_equals_window_pass_per_episode(arch):
    torch.manual_seed(0)
    config = small_config(arch)
    model = build_model(config)
    policy = LearnedPolicy(model, config)
    assert policy.recurrent and not policy.requires_privileged and not model.training
    frames = random_frames(np.random.default_rng(3), 10)  # (T, H, W, 3)
    starts = np.array([1, 0, 0, 0, 1, 0, 0, 1, 0, 0], bool)
    state, actions = None, []
    for t, frame in enumerate(frames):
        action, state = policy.predict({"image": frame, "speed": np.array([10.0], np.float32)}, state,
                                       episode_start=np.array([starts[t]]))
        assert action.shape == (1,) and action.dtype == np.float32
        assert isinstance(state, tuple) and all(isinstance(s, np.ndarray) for s in state)
        actions.append(action[0])
    pickle.loads(pickle.dumps(state))  # the state is plain numpy: it pickles
    expected = np.zeros(len(frames), np.float32)
    with torch.no_grad():
        for begin, end in _episodes(starts):
            expected[begin:end] = model.predict_sequence(to_tensor(frames[begin:end])[None])[0][0].numpy()
    np.testing.assert_allclose(actions, expected, atol=1e-5)


@pytest.mark.parametrize("arch", RECURRENT)
def test_batched_policy_resets_only_starting_envs(arch):
    torch.manual_seed(0)
    config = small_config(arch)
    model = build_model(config)
    policy = LearnedPolicy(model, config)
    n, steps = 3, 8
    frames = random_frames(np.random.default_rng(4), steps, n)  # (T, N, H, W, 3)
    starts = np.zeros((steps, n), bool)
    starts[0] = True
    starts[3, 0] = starts[5, 0] = True  # env 0: three episodes
    starts[6, 2] = True  # env 2: two episodes; env 1: one
    state, actions = None, []
    for t in range(steps):
        action, state = policy.predict({"image": frames[t], "speed": np.full((n, 1), 10.0, np.float32)},
                                       state, episode_start=starts[t])
        assert action.shape == (n, 1) and action.dtype == np.float32
        actions.append(action[:, 0])
    actions = np.stack(actions)  # (T, N)
    with torch.no_grad():
        for env in range(n):
            for begin, end in _episodes(starts[:, env]):
                seq = to_tensor(frames[begin:end, env])[None]
                np.testing.assert_allclose(actions[begin:end, env], model.predict_sequence(seq)[0][0].numpy(),
                                           atol=1e-5, err_msg=f"env {env}, episode [{begin}, {end})")
    with pytest.raises(ValueError, match="pass state=None"):
        policy.predict({"image": frames[0, :2]}, state)  # 2 envs, state for 3


def test_pilotnet_policy_contract():
    torch.manual_seed(0)
    config = small_config("pilotnet")
    model = build_model(config)
    with torch.no_grad():
        model.convs[0].bias += 5.0  # large outputs: the action must still lie in [-1, 1]
    policy = LearnedPolicy(model, config)
    assert not policy.recurrent
    frames = random_frames(np.random.default_rng(5), 3)
    actions, state = policy.predict({"image": frames, "speed": np.zeros((3, 1), np.float32)})
    assert actions.shape == (3, 1) and actions.dtype == np.float32 and state is None
    assert np.all(np.abs(actions) <= 1.0)
    single, _ = policy.predict({"image": frames[1]})
    assert single.shape == (1,)
    np.testing.assert_allclose(single, actions[1], atol=1e-6)
    with torch.no_grad():
        expected = model.predict_sequence(to_tensor(frames)[:, None])[0][:, 0].numpy()
    np.testing.assert_allclose(actions[:, 0], expected, atol=1e-6)
    described = policy.describe()
    assert described["kind"] == "learned" and described["arch"] == "pilotnet" and described["parameters"] > 0
    json.dumps(described)
    policy.reset()
    with pytest.raises(KeyError, match="image"):
        policy.predict({"speed": np.zeros(1)})
