"""Tests for agents.checkpoint: directory checkpoints (model.safetensors + config.json) round
trip exactly; anything else is refused with a message that says why, and nothing is ever
unpickled."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steerloop.agents.checkpoint import (CONFIG_FILE, FORMAT, WEIGHTS_FILE, CheckpointError, load_checkpoint,
                               load_policy_from_checkpoint, save_checkpoint)
from steerloop.agents.models import ARCHS, ModelConfig, build_model
from steerloop.agents.policy import LearnedPolicy
from steerloop.agents.preprocess import PreprocessConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = PreprocessConfig(crop_top=4, resize=(20, 40))
EXTRA = {"training": {"epochs": 3, "lr": 1e-3}, "data_manifest": "sha256:abc", "git_revision": "deadbeef",
         "seeds": {"torch": 0}, "threads": 1, "metrics": {"val_rmse": 0.05}}



class _Trap:
    """Unpickling this creates ``marker`` (proof that something was unpickled)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def no_unpickling(monkeypatch, tmp_path):
    """Fails the test if pickle or torch.load is used; yields the trap's marker path."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    marker = tmp_path / "UNPICKLED"
    yield marker
    assert not marker.exists(), "a pickle was loaded"


def trap_bytes(marker) -> bytes:
    return pickle.dumps(_Trap(marker))


def small_model(arch: str = "cnn-lstm", hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, preprocess=SMALL, hidden=hidden, feature_dim=32)
    return build_model(config).eval(), config


@pytest.fixture
def checkpoint(tmp_path):
    model, config = small_model()
    return save_checkpoint(tmp_path / "ckpt", model, config, EXTRA)


def edit_config(path, edit) -> None:
    meta = json.loads((path / CONFIG_FILE).read_text())
    edit(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_gives_identical_predictions(tmp_path, arch):
    model, config = small_model(arch)
    path = save_checkpoint(tmp_path / "ckpt", model, config, EXTRA)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["format"] == FORMAT and meta["format_version"] == 1 and meta["model"] == config.to_dict()

    loaded, loaded_config, loaded_meta = load_checkpoint(path)
    assert loaded_config == config and not loaded.training
    assert {k: loaded_meta[k] for k in EXTRA} == EXTRA and "model" not in loaded_meta
    images = torch.randn(2, 6, *SMALL.output_shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_sequence(images)[0], model.predict_sequence(images)[0],
                                   atol=0, rtol=0)

    frames = np.random.default_rng(0).integers(0, 256, (2, 24, 48, 3), dtype=np.uint8)
    policy = load_policy_from_checkpoint(path)
    assert isinstance(policy, LearnedPolicy) and policy.describe()["checkpoint"] == str(path)
    expected, _ = LearnedPolicy(model, config).predict({"image": frames})
    np.testing.assert_array_equal(policy.predict({"image": frames})[0], expected)


def test_save_overwrites_an_existing_checkpoint_and_leaves_no_temporaries(tmp_path):
    first, config = small_model(seed=0)
    second, _ = small_model(seed=1)
    path = save_checkpoint(tmp_path / "ckpt", first, config, {"run": 1})
    save_checkpoint(path, second, config, {"run": 2})
    loaded, _, meta = load_checkpoint(path)
    assert meta["run"] == 2
    for name, tensor in second.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_refuses_to_overwrite_something_that_is_not_a_checkpoint(tmp_path):
    model, config = small_model()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a steerloop checkpoint directory"):
        save_checkpoint(tmp_path / "results", model, config, {})
    assert (tmp_path / "results" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="format"):
        save_checkpoint(tmp_path / "ckpt", model, config, {"format": "mine"})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "ckpt", model, config, {"seed": object()})
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".ckpt"])
def test_refuses_pickle_file(tmp_path, no_unpickling, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(trap_bytes(no_unpickling))
    for load in (load_checkpoint, load_policy_from_checkpoint):
        with pytest.raises(CheckpointError, match="is a file") as info:
            load(path)
        message = str(info.value)
        assert "directories with model.safetensors and config.json" in message
        assert "pickle files are never loaded" in message


def test_refuses_directory_with_only_a_pickle(tmp_path, no_unpickling):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(trap_bytes(no_unpickling))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt")
    message = str(info.value)
    assert "missing config.json and model.safetensors" in message
    assert "model.pt" in message and "pickle files are never loaded" in message


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_refuses_missing_files_naming_them(checkpoint, missing):
    (checkpoint / missing).unlink()
    with pytest.raises(CheckpointError, match=f"missing {missing}"):
        load_checkpoint(checkpoint)


def test_refuses_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


def test_refuses_invalid_json(checkpoint):
    (checkpoint / CONFIG_FILE).write_text('{"format": "steerloop-checkpoint",')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(checkpoint)


def test_refuses_wrong_format_and_version(checkpoint):
    edit_config(checkpoint, lambda m: m.update(format_version=2))
    with pytest.raises(CheckpointError, match="format_version 2.*reads version 1"):
        load_checkpoint(checkpoint)
    edit_config(checkpoint, lambda m: m.update(format="huggingface", format_version=1))
    with pytest.raises(CheckpointError, match="not a steerloop checkpoint config.*'huggingface'"):
        load_checkpoint(checkpoint)


def test_refuses_unknown_arch_and_unknown_keys(checkpoint):
    edit_config(checkpoint, lambda m: m["model"].update(arch="transformer"))
    with pytest.raises(CheckpointError, match="unknown arch 'transformer'"):
        load_checkpoint(checkpoint)
    edit_config(checkpoint, lambda m: m["model"].update(arch="cnn-lstm", layers=3))
    with pytest.raises(CheckpointError, match=r"unknown key 'layers' \(did you mean 'lstm_layers'\?\)"):
        load_checkpoint(checkpoint)


def test_refuses_tampered_hidden_size_naming_tensors_and_shapes(checkpoint):
    edit_config(checkpoint, lambda m: m["model"].update(hidden=32))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(checkpoint)
    message = str(info.value)
    assert "do not match" in message and "arch='cnn-lstm'" in message
    assert "lstm.weight_hh_l0: file (64, 16) vs config (128, 32)" in message


def test_refuses_missing_and_unexpected_tensors(checkpoint):
    model, _ = small_model()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("steering_head")}
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(checkpoint / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"missing tensors: steering_head\.bias, steering_head\.weight"
                                              r".*unexpected tensors: extra\.weight"):
        load_checkpoint(checkpoint)


def test_refuses_pickle_disguised_as_safetensors(checkpoint, no_unpickling):
    (checkpoint / WEIGHTS_FILE).write_bytes(trap_bytes(no_unpickling))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(checkpoint)


def test_loading_a_valid_checkpoint_never_unpickles(checkpoint, no_unpickling):
    (checkpoint / "optimizer.pt").write_bytes(trap_bytes(no_unpickling))  # stray file: ignored
    model, config, _ = load_checkpoint(checkpoint)
    assert config.arch == "cnn-lstm"
