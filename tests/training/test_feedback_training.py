"""Training fed-back inputs (training.data, training.train, training.copycat): the logged
values one step back (the executed command, not the label), the feedback modes and their
schedule, keyframe weights, and tiny end-to-end runs of every mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerloop.agents.checkpoint import load_checkpoint
from steerloop.agents.preprocess import PreprocessConfig
from steerloop.errors import SteerloopError
from steerloop.sim.camera import CameraSpec
from steerloop.training.copycat import copycat_probe, history_design, keyframe_weights, probe_ratio
from steerloop.training.data import BatchMaker, Episode, previous, windows
from steerloop.training.train import TrainConfig, train

from helpers import TINY, record_short_log


def episodes_with_noise(lengths) -> list[Episode]:
    """Labels 100 e + t; executed commands differ from them (as under DART noise): -(100 e + t)."""
    out = []
    for index, n in enumerate(lengths):
        label = (index * 100 + np.arange(n)).astype(np.float32)
        out.append(Episode(source="fake", index=index, frames={"center": np.full((n, *TINY, 3), index, np.uint8)},
                           steering=label, speed=label + 1000, throttle=label + 2000, executed=-label))
    return out


def test_previous_values_by_hand():
    series = np.arange(1, 6, dtype=np.float32)  # 1..5
    np.testing.assert_array_equal(previous(series, 0, 3), [0, 1, 2])  # nothing executed before the first step
    np.testing.assert_array_equal(previous(series, 2, 3), [2, 3, 4])
    np.testing.assert_array_equal(previous(series, 4, 1), [4])


def test_batches_carry_the_executed_command_one_step_back_not_the_label():
    episodes = episodes_with_noise([7, 5])
    make = BatchMaker(episodes, 3, PreprocessConfig(crop_top=4, resize=(12, 32)), CameraSpec(height=16, width=32),
                      ("center",), ())
    batch_windows = windows(episodes, [0, 1], 3, 2)
    batch = make(batch_windows)
    for (e, start), prev, prev_speed, prev_throttle in zip(batch_windows, batch["prev_steering"].numpy(),
                                                           batch["prev_speed"].numpy(),
                                                           batch["prev_throttle"].numpy()):
        steps = np.arange(start - 1, start + 2)
        expected = np.where(steps >= 0, -(e * 100 + steps), 0)
        np.testing.assert_array_equal(prev, expected)
        np.testing.assert_array_equal(prev_speed, np.where(steps >= 0, e * 100 + steps + 1000, 0))
        np.testing.assert_array_equal(prev_throttle, np.where(steps >= 0, e * 100 + steps + 2000, 0))
    assert "weight" not in batch


def test_keyframe_weights_reach_training_batches_only():
    episodes = episodes_with_noise([7, 5])
    weights = [np.linspace(0.5, 1.5, len(ep)).astype(np.float32) for ep in episodes]
    make = BatchMaker(episodes, 3, PreprocessConfig(crop_top=4, resize=(12, 32)), CameraSpec(height=16, width=32),
                      ("center",), (), weights)
    batch_windows = windows(episodes, [0, 1], 3, 2)
    assert "weight" not in make(batch_windows)  # validation: unweighted
    batch = make(batch_windows, np.random.default_rng(0))
    for (e, start), w in zip(batch_windows, batch["weight"].numpy()):
        np.testing.assert_array_equal(w, weights[e][start:start + 3])


# ----------------------------------------------------------------------------- the history regression
def test_history_design_never_crosses_sequences_and_pads_with_zeros():
    x, y, counts = history_design([np.array([1., 2, 3, 4]), np.array([5., 6, 7])], [np.array([1., 2, 3, 4]),
                                                                                  np.array([5., 6, 7])], k=2)
    assert counts == [2, 1]
    np.testing.assert_array_equal(x, [[2, 1], [3, 2], [6, 5]])
    np.testing.assert_array_equal(y, [3, 4, 7])
    x, y, counts = history_design([np.array([1., 2])], [np.array([9., 8])], k=2, pad=True)
    np.testing.assert_array_equal(x, [[0, 0], [1, 0]])
    np.testing.assert_array_equal(y, [9, 8])


def test_copycat_probe_separates_smooth_from_unpredictable_actions():
    rng = np.random.default_rng(0)
    smooth = [np.sin(np.arange(400) / 20 + phase) for phase in (0.0, 1.0)]  # fully predictable from its past
    noise = [rng.normal(0, 0.3, 400) for _ in range(2)]
    a, b = copycat_probe(smooth), copycat_probe(noise)
    assert a["r2"] > 0.999 and a["frames"] == 2 * (400 - 4)
    assert abs(b["r2"]) < 0.05 and b["rmse"] == pytest.approx(0.3, rel=0.1)
    assert probe_ratio(a, b) < 0.01
    assert copycat_probe([np.zeros(50)])["r2"] is None  # constant actions: nothing to explain
    assert copycat_probe([np.ones(3)])["r2"] is None  # too short


def test_keyframe_weights_peak_where_the_command_changes_unpredictably():
    steady = np.concatenate([np.zeros(50), np.full(50, 0.5)])  # one step change at t = 50
    weights = keyframe_weights([steady], [steady], strength=4.0, k=2)[0]
    assert weights.dtype == np.float32 and weights.mean() == pytest.approx(1.0, rel=1e-6)
    assert int(np.argmax(weights)) == 50 and weights[50] > 5 * np.median(weights)
    np.testing.assert_allclose(keyframe_weights([steady], [steady], strength=0.0)[0], 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides,match", [
    ({"inputs": ("image", "prev_steer")}, "inputs"), ({"inputs": ("speed",)}, "image is missing"),
    ({"feedback_mode": "nope"}, "feedback_mode"),
    ({"feedback_mode": "scheduled"}, "add prev_steering"), ({"feedback_mode": "dropout"}, "add prev_steering"),
    ({"feedback_mode": "scheduled", "inputs": ("image", "prev_steering"), "model": "pilotnet"}, "seq_len >= 2"),
    ({"sampling_final": 1.5}, "sampling_final"), ({"input_dropout": -0.1}, "input_dropout"),
    ({"keyframe_strength": -1.0}, "keyframe_strength"),
])
def test_feedback_options_are_checked(overrides, match):
    with pytest.raises(SteerloopError, match=match):
        TrainConfig(**{"data": ["somewhere"], "out": "nowhere", **overrides})


def test_schedules():
    base = {"data": ["d"], "out": "o", "inputs": ("image", "prev_steering")}
    scheduled = TrainConfig(**base, feedback_mode="scheduled", sampling_final=0.8)
    assert [scheduled.feedback_schedule(s, 5)["own_probability"] for s in range(5)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8])
    assert TrainConfig(**base, feedback_mode="dropout", input_dropout=0.3).feedback_schedule(7, 10) == {
        "drop_probability": 0.3}
    assert TrainConfig(**base).feedback_schedule(3, 10) == {}
    assert TrainConfig(**base, model="komanda").seq_len == 10 and TrainConfig(**base, model="chauffeur").seq_len == 50
    assert TrainConfig(data=["d"], out="o", model="komanda", feedback_mode="scheduled").model_config().feedback == (
        "steering", "speed", "throttle")


# ----------------------------------------------------------------------------- tiny runs
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """3 DART-noisy expert episodes on the short spec at 16x32: executed != label."""
    return record_short_log(tmp_path_factory.mktemp("feedback-data"), 3, noise=0.1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model,mode", [("cnn-lstm", "teacher"), ("pilotnet", "keyframe"), ("komanda", "scheduled"),
                                        ("conv3d-lstm", "dropout")])
def test_tiny_runs_of_every_mode(dataset, tmp_path, model, mode):
    cfg = TrainConfig(data=[dataset], out=str(tmp_path / "run"), model=model, inputs=("image", "prev_steering", "speed"),
                      feedback_mode=mode, seq_len=1 if model == "pilotnet" else 4, batch_frames=16, epochs=1,
                      crop_top=4, input_size=(12, 32), threads=1, warmup_steps=2, hidden=8, augment=())
    result = train(cfg, progress_bar=False)
    _, config, meta = load_checkpoint(tmp_path / "run" / "best")
    assert config.inputs == ("image", "prev_steering", "speed")
    assert meta["training"]["feedback_mode"] == mode
    assert np.isfinite(result["val_rmse"]) and np.isfinite(result["val_rmse_free_running"])


# ----------------------------------------------------------------------------- chauffeur's frozen encoder
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("target", ["steering", "lane"])
def test_chauffeur_pretrains_its_encoder_then_keeps_it_frozen(dataset, tmp_path, target):
    from safetensors.torch import load_file

    cfg = TrainConfig(data=[dataset], out=str(tmp_path / "run"), model="chauffeur", seq_len=8, batch_frames=16,
                      epochs=1, crop_top=4, input_size=(12, 32), threads=1, warmup_steps=2, hidden=8, augment=(),
                      encoder_target=target, encoder_epochs=1)
    train(cfg, progress_bar=False)
    encoder = json.loads((tmp_path / "run" / "encoder" / "encoder.json").read_text())
    assert encoder["target"] == target and encoder["frames"] > 100
    pretrained = load_file(str(tmp_path / "run" / "encoder" / "encoder.safetensors"))
    trained = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    for name, value in pretrained.items():
        assert torch_equal(trained[name], value), name  # frozen: the chauffeur kept the pretrained weights exactly
    _, config, meta = load_checkpoint(tmp_path / "run" / "best")
    assert config.arch == "chauffeur" and meta["encoder"]["target"] == target
    # a second chauffeur reuses a given encoder (here: the first one's checkpoint)
    again = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "again"), "encoder": str(tmp_path / "run" / "best")})
    train(again, progress_bar=False)
    assert not (tmp_path / "again" / "encoder").exists()
    assert torch_equal(load_file(str(tmp_path / "again" / "best" / "model.safetensors"))["encoder.fc.1.weight"],
                       pretrained["encoder.fc.1.weight"])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_encoder_options_are_checked(tmp_path):
    with pytest.raises(SteerloopError, match="model chauffeur"):
        TrainConfig(data=["d"], out="o", model="cnn-lstm", encoder="somewhere")
    with pytest.raises(SteerloopError, match="encoder_target"):
        TrainConfig(data=["d"], out="o", model="chauffeur", encoder_target="pixels")
    from steerloop.agents.models import build_model
    from steerloop.training.encoder import EncoderError, load_encoder

    model = build_model(TrainConfig(data=["d"], out="o", model="chauffeur", input_size=(12, 32)).model_config())
    with pytest.raises(EncoderError, match="neither an encoder directory"):
        load_encoder(tmp_path, model)
