"""Behaviour cloning (training.data, training.train): episode-level splits, windows,
checkpoints with provenance, bit-exact resumption and refusal of a different run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import steerloop.training.train as train_module
from steerloop.agents.checkpoint import load_checkpoint
from steerloop.agents.models import build_model
from steerloop.agents.preprocess import PreprocessConfig
from steerloop.sim.camera import CameraSpec
from steerloop.training.data import BatchMaker, Episode, load_episodes, manifest_id, split_episodes, windows
from steerloop.training.record import RecordConfig, record
from steerloop.training.train import STATE_DIR, TrainConfig, train

from helpers import SHORT_SPEC, record_short_log

TINY = (16, 32)


# ----------------------------------------------------------------------------- split and windows
@pytest.mark.parametrize("n", [2, 3, 5, 10, 37])
@pytest.mark.parametrize("val_fraction", [0.05, 0.2, 0.5, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_split_is_by_episode_disjoint_and_deterministic(n, val_fraction, seed):
    train_eps, val_eps = split_episodes(n, val_fraction, seed)
    assert (train_eps, val_eps) == split_episodes(n, val_fraction, seed)
    assert not set(train_eps) & set(val_eps)
    assert sorted(train_eps + val_eps) == list(range(n))
    assert train_eps and val_eps  # at least one episode on each side
    assert train_eps == sorted(train_eps) and val_eps == sorted(val_eps)
    assert len(val_eps) == min(max(1, int(round(n * val_fraction))), n - 1)


def test_split_depends_on_the_seed():
    splits = {tuple(split_episodes(20, 0.2, seed)[1]) for seed in range(10)}
    assert len(splits) > 1


def test_split_needs_two_episodes():
    with pytest.raises(ValueError, match="at least 2"):
        split_episodes(1, 0.2, 0)


def fake_episodes(lengths) -> list[Episode]:
    episodes = []
    for index, n in enumerate(lengths):
        steps = np.arange(n, dtype=np.float32)
        episodes.append(Episode(source="fake", index=index,
                                frames={"center": np.full((n, *TINY, 3), index, np.uint8)},
                                steering=index * 100 + steps, speed=np.full(n, 10.0, np.float32),
                                throttle=np.zeros(n, np.float32)))
    return episodes


def test_windows_by_hand():
    episodes = fake_episodes([5, 10, 3])
    got = windows(episodes, [0, 1, 2], length=4, stride=2)
    assert got.dtype == np.int64 and got.shape == (5, 2)
    assert got.tolist() == [[0, 0], [1, 0], [1, 2], [1, 4], [1, 6]]
    assert windows(episodes, [2], length=4, stride=1).shape == (0, 2)  # too short: no window
    assert windows(episodes, [0], length=5, stride=1).tolist() == [[0, 0]]


@pytest.mark.parametrize("length,stride", [(1, 1), (4, 2), (4, 4), (7, 3), (16, 8)])
def test_windows_never_cross_episode_boundaries(length, stride):
    episodes = fake_episodes([12, 5, 30, 16, 1])
    which = [0, 2, 3, 4]
    got = windows(episodes, which, length, stride)
    assert set(got[:, 0].tolist()) <= set(which)
    for e, start in got:
        assert 0 <= start and start + length <= len(episodes[e])
    for e in which:  # every full window at the stride is there
        n = len(episodes[e])
        expected = list(range(0, n - length + 1, stride)) if n >= length else []
        assert got[got[:, 0] == e][:, 1].tolist() == expected


def test_batches_of_windows_stay_in_one_episode():
    episodes = fake_episodes([9, 6])
    make = BatchMaker(episodes, 4, PreprocessConfig(crop_top=4, resize=TINY), CameraSpec(height=16, width=32),
                      ("center",), ())
    batch_windows = windows(episodes, [0, 1], 4, 2)
    images, steering, speed, throttle = make.raw(batch_windows, rng=None)
    assert images.shape == (len(batch_windows), 4, *TINY, 3) and steering.shape == (len(batch_windows), 4)
    for (e, start), labels, frames in zip(batch_windows, steering, images):
        np.testing.assert_array_equal(labels, e * 100 + np.arange(start, start + 4))  # one episode, consecutive
        assert np.all(frames == e)
    batch = make(batch_windows)
    assert batch["images"].shape[:2] == (len(batch_windows), 4)


# ----------------------------------------------------------------------------- tiny training runs
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """3 expert episodes (~150 steps each) on the short spec at 16x32."""
    return record_short_log(tmp_path_factory.mktemp("train-data"), 3)


def tiny_train_config(data: str, out, **overrides) -> TrainConfig:
    base = {"data": [data], "out": str(out), "model": "cnn-lstm", "epochs": 1, "seq_len": 4, "batch_frames": 16,
            "crop_top": 4, "input_size": TINY, "threads": 1, "warmup_steps": 5, "hidden": 16}
    base.update(overrides)
    return TrainConfig(**base)


def test_load_episodes_reads_the_clean_labels(dataset):
    episodes, reference = load_episodes([dataset], ("center",))
    assert len(episodes) == 3
    assert reference["resolution"] == TINY
    for episode in episodes:
        assert episode.frames["center"].shape == (len(episode), *TINY, 3)
        assert episode.steering.dtype == np.float32 and len(episode.steering) == len(episode)


def test_load_episodes_needs_the_cameras(dataset):
    with pytest.raises(ValueError, match="camera"):
        load_episodes([dataset], ("center", "left", "right"))


@pytest.mark.parametrize("model,seq_len", [("pilotnet", 1), ("cnn-lstm", 4)])
def test_tiny_training_writes_loadable_checkpoints_with_provenance(dataset, tmp_path, model, seq_len):
    cfg = tiny_train_config(dataset, tmp_path / model, model=model, seq_len=seq_len, epochs=1)
    result = train(cfg, progress_bar=False)
    out = tmp_path / model
    assert result["out"] == str(out) and result["epochs_run"] == 1
    assert np.isfinite(result["val_rmse"]) and np.isfinite(result["zeros_rmse"])
    assert (out / STATE_DIR / "state.safetensors").is_file()
    for which in ("best", "last"):
        assert (out / which / "model.safetensors").is_file() and (out / which / "config.json").is_file()
        loaded, config, meta = load_checkpoint(out / which)
        assert config.arch == model
        assert config.preprocess.crop_top == 4 and tuple(config.preprocess.resize) == TINY
        assert not loaded.training  # eval mode
        stored = json.loads((out / which / "config.json").read_text())
        assert stored["training"] == meta["training"]
        training = meta["training"]
        assert training["model"] == model and training["seq_len"] == seq_len and training["epochs"] == 1
        assert training["data"] == [dataset] and training["threads"] == 1 and training["seed"] == 0
        assert meta["data_manifest_id"] == manifest_id([dataset])
        assert isinstance(meta["git_revision"], str) and meta["git_revision"]
        assert meta["seed"] == 0 and meta["threads"] == 1
        assert meta["epoch"] == 1
        assert meta["train_episodes"] + meta["val_episodes"] == 3
        for key in ("val_rmse", "zeros_rmse", "val_loss"):
            assert np.isfinite(meta["metrics"][key]), key
        assert meta["metrics"]["zeros_rmse"] > 0
    assert result["val_rmse"] == load_checkpoint(out / "best")[2]["metrics"]["val_rmse"]
    assert json.loads((out / "train_config.json").read_text())["model"] == model


def test_manifest_id_changes_with_the_data(dataset, tmp_path):
    assert manifest_id([dataset]) == manifest_id([dataset])
    assert len(manifest_id([dataset])) == 16
    assert manifest_id([dataset, dataset]) != manifest_id([dataset])


def test_episodes_shorter_than_the_window_are_refused(dataset, tmp_path):
    cfg = tiny_train_config(dataset, tmp_path / "long", seq_len=2000, batch_frames=2000)
    with pytest.raises(ValueError, match="seq_len"):
        train(cfg, progress_bar=False)


def test_a_run_refused_before_training_does_not_lock_its_out(dataset, tmp_path):
    out = tmp_path / "retry"
    with pytest.raises(ValueError, match="seq_len"):
        train(tiny_train_config(dataset, out, seq_len=2000, batch_frames=2000), progress_bar=False)
    # nothing was trained: the corrected command must be able to use the same directory
    train(tiny_train_config(dataset, out), progress_bar=False)


@pytest.mark.parametrize("overrides,match", [
    ({"model": "transformer"}, "model"), ({"seq_len": 32, "batch_frames": 16}, "seq_len"),
    ({"camera": "rear"}, "camera"), ({"augment": ("blur",)}, "augment"), ({"augment": ("side",)}, "camera to all"),
    ({"val_fraction": 1.0}, "val_fraction"), ({"epochs": 0}, "epochs"), ({"data": []}, "data"),
])
def test_train_config_validation(overrides, match):
    base = {"data": ["somewhere"], "out": "nowhere"}
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- resumption
def tensors(path) -> dict:
    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


RESUMED = {"epochs": 2, "keep_epochs": (1, 2)}  # the resumed runs keep a checkpoint after every epoch


@pytest.fixture(scope="module")
def resume_runs(dataset, tmp_path_factory):
    """Run A: 2 epochs uninterrupted. Run B: the same config, interrupted at the first step of
    epoch 2 (KeyboardInterrupt), then re-run to completion. Both keep epoch_01/ and epoch_02/."""
    root = tmp_path_factory.mktemp("resume")
    cfg_a = tiny_train_config(dataset, root / "A", **RESUMED)
    result_a = train(cfg_a, progress_bar=False)
    cfg_b = dataclasses.replace(cfg_a, out=str(root / "B"))
    real_lr_at = train_module.lr_at
    seen = {}

    def interrupting_lr_at(step, total, cfg):
        steps_per_epoch = total // cfg.epochs
        if step >= steps_per_epoch:
            seen["step"] = step
            raise KeyboardInterrupt
        return real_lr_at(step, total, cfg)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "lr_at", interrupting_lr_at)
        with pytest.raises(KeyboardInterrupt):
            train(cfg_b, progress_bar=False)
    interrupted = {
        "progress": json.loads((root / "B" / STATE_DIR / "progress.json").read_text()),
        "last_epoch": load_checkpoint(root / "B" / "last")[2]["epoch"],
        "step": seen.get("step"),
        "epoch_dirs": sorted(p.name for p in (root / "B").glob("epoch_*")),
        "epoch_01": (root / "B" / "epoch_01" / "model.safetensors").read_bytes(),
    }
    result_b = train(cfg_b, progress_bar=False)
    return root, result_a, result_b, interrupted


def test_interruption_keeps_the_state_of_the_finished_epoch(resume_runs):
    _, _, _, interrupted = resume_runs
    assert interrupted["step"] is not None
    assert interrupted["progress"]["epoch"] == 1
    assert interrupted["progress"]["step"] == interrupted["step"]
    assert len(interrupted["progress"]["history"]) == 1
    assert interrupted["last_epoch"] == 1
    assert interrupted["epoch_dirs"] == ["epoch_01"], "only the finished epoch's checkpoint exists"


def test_resumed_run_is_bit_identical_to_uninterrupted(resume_runs):
    root, result_a, result_b, _ = resume_runs
    assert_same_tensors(tensors(root / "A" / "last" / "model.safetensors"),
                        tensors(root / "B" / "last" / "model.safetensors"))
    assert_same_tensors(tensors(root / "A" / "best" / "model.safetensors"),
                        tensors(root / "B" / "best" / "model.safetensors"))
    # optimiser moments and counters too
    assert_same_tensors(tensors(root / "A" / STATE_DIR / "state.safetensors"),
                        tensors(root / "B" / STATE_DIR / "state.safetensors"))
    progress_a = json.loads((root / "A" / STATE_DIR / "progress.json").read_text())
    progress_b = json.loads((root / "B" / STATE_DIR / "progress.json").read_text())
    assert progress_a == progress_b and progress_a["epoch"] == 2
    assert result_b["epochs_run"] == result_a["epochs_run"] == 2
    for key in ("val_loss", "val_rmse", "zeros_rmse"):
        assert result_a[key] == result_b[key], key
    meta_a = load_checkpoint(root / "A" / "last")[2]
    meta_b = load_checkpoint(root / "B" / "last")[2]
    assert meta_a["metrics"] == meta_b["metrics"] and meta_a["epoch"] == meta_b["epoch"] == 2


def test_kept_epochs_survive_resumption_and_match_the_uninterrupted_run(resume_runs):
    """keep_epochs: the resumed run kept the epoch_01/ written before the interruption (same
    bytes) and wrote epoch_02/; both equal the uninterrupted run's, and load as policies."""
    from steerloop.agents import load_policy

    root, _, _, interrupted = resume_runs
    assert sorted(p.name for p in (root / "B").glob("epoch_*")) == ["epoch_01", "epoch_02"]
    assert (root / "B" / "epoch_01" / "model.safetensors").read_bytes() == interrupted["epoch_01"]
    history = json.loads((root / "A" / STATE_DIR / "progress.json").read_text())["history"]
    for epoch in (1, 2):
        name = f"epoch_{epoch:02d}"
        assert (root / "A" / name / "model.safetensors").read_bytes() == \
            (root / "B" / name / "model.safetensors").read_bytes(), name
        meta_a, meta_b = load_checkpoint(root / "A" / name)[2], load_checkpoint(root / "B" / name)[2]
        assert meta_a["epoch"] == meta_b["epoch"] == epoch
        assert meta_a["metrics"] == meta_b["metrics"] == {k: v for k, v in history[epoch - 1].items() if k != "epoch"}
        assert meta_a["training"]["keep_epochs"] == [1, 2]
    assert_same_tensors(tensors(root / "A" / "epoch_02" / "model.safetensors"),
                        tensors(root / "A" / "last" / "model.safetensors"))
    load_policy(str(root / "B" / "epoch_01"))  # a policy spec like best/


def test_a_run_recorded_before_keep_epochs_existed_still_resumes(dataset, tmp_path):
    """train_config.json written before the field existed has no keep_epochs: the same run
    (keep_epochs at its default) is accepted as the same configuration, not refused."""
    old = tmp_path / "old"
    train(tiny_train_config(dataset, old), progress_bar=False)
    config = json.loads((old / "train_config.json").read_text())
    del config["keep_epochs"]
    (old / "train_config.json").write_text(json.dumps(config))
    before = (old / "last" / "model.safetensors").read_bytes()
    assert train(tiny_train_config(dataset, old), progress_bar=False)["epochs_run"] == 1
    assert (old / "last" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("keep, message", [((0,), "within 1..epochs (1..2), got [0]"),
                                           ((1, 3), "within 1..epochs (1..2), got [3]"),
                                           ((1.5,), "whole epoch numbers")])
def test_keep_epochs_outside_the_run_are_refused(keep, message):
    with pytest.raises(ValueError, match=r"^keep_epochs must be") as error:
        TrainConfig(data=["somewhere"], out="nowhere", epochs=2, keep_epochs=keep)
    assert message in str(error.value)


def test_keep_epochs_flag_parses_and_a_bad_value_exits_2(tmp_path, capsys):
    from steerloop.evaluation.cli import build_parser, main

    args = build_parser("train").parse_args(["train", "--data", "d", "--out", "o", "--keep-epochs", "3,1"])
    assert args.keep_epochs == (3, 1)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "2",
                 "--keep-epochs", "1,5"]) == 2
    assert "--keep-epochs must be within 1..epochs (1..2), got [5]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rerunning_a_finished_run_changes_nothing(resume_runs, dataset):
    root, result_a, _, _ = resume_runs
    before = tensors(root / "A" / "last" / "model.safetensors")
    result = train(tiny_train_config(dataset, root / "A", **RESUMED), progress_bar=False)
    assert result["epochs_run"] == 2 and result["val_rmse"] == result_a["val_rmse"]
    assert_same_tensors(before, tensors(root / "A" / "last" / "model.safetensors"))


@pytest.mark.parametrize("overrides", [{"epochs": 3}, {"lr": 5e-4}, {"model": "pilotnet", "seq_len": 1},
                                       {"seed": 1}, {"keep_epochs": (1,)}])
def test_a_different_config_on_the_same_out_is_refused(resume_runs, dataset, overrides):
    root, _, _, _ = resume_runs
    config_file = root / "A" / "train_config.json"
    before_config = config_file.read_bytes()
    before_weights = (root / "A" / "last" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="different configuration") as error:
        train(tiny_train_config(dataset, root / "A", **{**RESUMED, **overrides}), progress_bar=False)
    assert str(root / "A") in str(error.value)
    assert config_file.read_bytes() == before_config
    assert (root / "A" / "last" / "model.safetensors").read_bytes() == before_weights


def test_side_cameras_train_with_corrective_labels(tmp_path):
    """--camera all --augment side: left/right frames join training with corrected labels."""
    spec = tmp_path / "short.json"
    spec.write_text(json.dumps(SHORT_SPEC))
    data = tmp_path / "log3"
    record(RecordConfig(out=str(data), episodes=2, track=str(spec), resolution=TINY,
                        cameras=("center", "left", "right")), progress=False)
    cfg = tiny_train_config(str(data), tmp_path / "run", model="pilotnet", seq_len=1, camera="all",
                            augment=("side",))
    result = train(cfg, progress_bar=False)
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert result["val_rmse"] >= 0.0
    episodes, _ = load_episodes([str(data)], ("center", "left", "right"))
    make = BatchMaker(episodes, 1, PreprocessConfig(crop_top=4, resize=TINY), CameraSpec(height=TINY[0], width=TINY[1]),
                      ("center", "left", "right"), ("side",))
    all_windows = windows(episodes, [0], 1, 1)
    _, labels, _, _ = make.raw(all_windows, np.random.default_rng(0))
    clean = episodes[0].steering[all_windows[:, 1]]
    shifted = ~np.isclose(labels[:, 0], clean)
    assert shifted.any() and (~shifted).any()  # some windows came from side cameras, some from the centre


def test_overfits_a_two_episode_driving_log(tmp_path):
    """The models can fit a real (tiny) two-episode recording: the loss falls below 10% of its start."""
    spec = tmp_path / "short.json"
    spec.write_text(json.dumps(SHORT_SPEC))
    data = tmp_path / "two"
    record(RecordConfig(out=str(data), episodes=2, track=str(spec), resolution=TINY), progress=False)
    episodes, _ = load_episodes([str(data)], ("center",))
    config = TrainConfig(data=[str(data)], model="cnn-lstm", seq_len=8, crop_top=4, input_size=TINY,
                         hidden=16).model_config()
    make = BatchMaker(episodes, 8, config.preprocess, CameraSpec(height=TINY[0], width=TINY[1]), ("center",), ())
    batch = make(windows(episodes, [0, 1], 8, 8))  # every window of both episodes, no augmentation
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        loss, _ = model(batch)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final, _ = model(batch)
    assert final.item() < 0.1 * first
