"""Offline metrics for history and copycat (evaluation.copycat, evaluation.offline): the
repeat-previous baseline, the change-point / steady split, teacher-forced beside
free-running replay of a fed-back model, and the copycat probe on logged and closed-loop
sequences."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from steerloop.agents.checkpoint import load_policy_from_checkpoint, save_checkpoint
from steerloop.agents.models import ModelConfig, build_model
from steerloop.agents.preprocess import PreprocessConfig, preprocess
from steerloop.evaluation.copycat import (change_points, closed_loop_probe, event_errors, own_runs,
                                          repeat_previous)
from steerloop.evaluation.offline import evaluate_offline, offline_metrics, offline_table, replay
from steerloop.driving_log import DrivingLog
from steerloop.training.copycat import copycat_probe

from helpers import record_short_log

pytestmark = pytest.mark.usefixtures("one_thread")


def test_repeat_previous_and_change_points_by_hand():
    np.testing.assert_array_equal(repeat_previous(np.array([0.1, 0.2, 0.3], np.float32)),
                                  np.array([0.0, 0.1, 0.2], np.float32))
    steady_then_step = np.array([0.0] * 10 + [0.5] * 10)
    ramp = np.linspace(0, 0.2, 20)  # changes by ~0.0105 per step everywhere
    masks, threshold = change_points([steady_then_step, ramp], quantile=0.99, margin=2)
    assert threshold == pytest.approx(np.quantile(np.concatenate([np.abs(np.diff(steady_then_step, prepend=0)),
                                                                  np.abs(np.diff(ramp, prepend=0))]), 0.99))
    assert np.flatnonzero(masks[0]).tolist() == [8, 9, 10, 11, 12]  # the step at t = 10, +-2 steps
    assert not masks[1].any()
    errors = event_errors([np.zeros(20), np.zeros(20)], [steady_then_step, ramp], masks)
    assert errors["change_point_frames"] == 5 and errors["steady_frames"] == 35
    at = np.concatenate([steady_then_step[8:13]])
    assert errors["change_point_rmse"] == pytest.approx(np.sqrt(np.mean(at ** 2)))
    never = change_points([np.zeros(5)])[0][0]
    assert not never.any()  # a command that never changes has no change-point


def test_own_runs_cut_where_a_perturbation_overrode_the_policy():
    trajectory = {"steering": np.arange(8.0), "policy_overridden": np.array([0, 0, 1, 1, 0, 0, 0, 1], bool)}
    runs = own_runs(trajectory)
    assert [r.tolist() for r in runs] == [[0.0, 1.0], [4.0, 5.0, 6.0]]
    assert [r.tolist() for r in own_runs({"steering": np.arange(3.0)})] == [[0.0, 1.0, 2.0]]


def test_closed_loop_probe_reads_every_saved_trajectory(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "trajectories").mkdir()
    runs = []
    for i in range(3):
        steering = np.cumsum(rng.normal(0, 0.02, 60))
        overridden = np.zeros(60, bool)
        overridden[30:33] = True
        np.savez_compressed(tmp_path / "trajectories" / f"s{i}.npz", steering=steering, policy_overridden=overridden)
        runs += [steering[:30], steering[33:]]
    assert closed_loop_probe(tmp_path) == copycat_probe(runs)


# ----------------------------------------------------------------------------- evaluate_offline
@pytest.fixture(scope="module")
def noisy_log(tmp_path_factory) -> str:
    """2 DART-noisy expert episodes on the short spec: the executed command differs from the label."""
    return record_short_log(tmp_path_factory.mktemp("offline-history"), 2, noise=0.2)


def _logged(path: str):
    log = DrivingLog(path)
    episodes = [log.read_episode(i, cameras=["center"]) for i in log.episodes]
    log.close()
    return episodes


def test_baselines_events_and_probe_beside_every_offline_result(noisy_log):
    result = evaluate_offline("zeros", noisy_log)
    episodes = _logged(noisy_log)
    labels = [e["expert_steering"] for e in episodes]
    assert any(np.abs(e["steering"] - e["expert_steering"]).max() > 0.01 for e in episodes)  # noisy: they differ
    dt = 1.0 / 20
    expected = offline_metrics([repeat_previous(e["steering"]) for e in episodes], labels,
                               [e["speed"] for e in episodes], dt)
    assert result["repeat_previous"] == pytest.approx(expected)
    assert result["fed_back"] == [] and "teacher_forced" not in result
    events = result["events"]
    assert events["model"] == events["zeros"]  # the zeros policy is the all-zeros predictor
    assert events["repeat_previous"]["change_point_rmse"] > events["repeat_previous"]["steady_rmse"]
    assert result["copycat_probe"]["expert"] == copycat_probe(labels)
    text = offline_table(result)
    assert "repeat-prev" in text and "rmse at change-points" in text and "copycat probe" in text


def test_fed_back_models_are_replayed_teacher_forced_and_free_running(noisy_log, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(arch="cnn-lstm", preprocess=PreprocessConfig(crop_top=4, resize=(12, 32)), hidden=8,
                         feature_dim=16, inputs=("image", "prev_steering", "speed"))
    model = build_model(config)
    with torch.no_grad():
        model.lstm.weight_ih_l0[:, -2:] *= 30.0  # the fed-back input weighs heavily
    path = save_checkpoint(tmp_path / "fed", model, config)
    result = evaluate_offline(str(path), noisy_log, series=str(tmp_path / "replay.npz"))
    assert result["fed_back"] == ["steering"]
    policy = load_policy_from_checkpoint(path)
    log = DrivingLog(noisy_log)
    free = replay(policy, log, log.episodes[0])
    log.close()
    episode = _logged(noisy_log)[0]
    x = torch.from_numpy(preprocess(episode["frames/center"], config.preprocess))[None]
    teacher = torch.from_numpy(repeat_previous(episode["steering"]))[None, :, None]  # the executed command, t-1
    with torch.no_grad():
        by_hand, _ = policy.model.predict_sequence(x, speed=torch.from_numpy(episode["speed"])[None], teacher=teacher)
    with np.load(tmp_path / "replay.npz") as saved:
        np.testing.assert_array_equal(saved["prediction_0"], free)
        np.testing.assert_allclose(saved["teacher_forced_0"], by_hand[0].numpy(), atol=1e-5)
    assert np.abs(free - by_hand[0].numpy()).max() > 1e-3  # free running is not fed the logged commands
    assert result["teacher_forced"]["rmse"] != result["model"]["rmse"]
    assert "teacher" in offline_table(result) and "free-run" in offline_table(result)


# ----------------------------------------------------------------------------- report findings
def _row(name, *, fed: bool, offline: float, success: float, seq_len: int = 16, mode: str = "teacher",
         recipe: str = "a", probe_unexplained: float = 0.5, arch: str = "cnn-lstm"):
    from steerloop.evaluation.report import PolicyRow

    events = {"change_point_rmse": 2 * offline, "steady_rmse": offline}
    history = {"fed_back": fed, "inputs": ["image", "prev_steering"] if fed else ["image"], "mode": mode,
               "seq_len": seq_len, "recipe": {"r": recipe, "mode": mode, "fed": fed},
               "teacher_forced": {"rmse": offline} if fed else None, "repeat_previous": {"rmse": 0.01},
               "events": {"model": events, "repeat_previous": {"change_point_rmse": 0.05, "steady_rmse": 0.005}},
               "expert_probe": {"k": 4, "r2": 0.9, "unexplained": 0.1},
               "probe": {"k": 4, "r2": 1 - probe_unexplained, "unexplained": probe_unexplained}}
    return PolicyRow(name=name, family=arch, arch=arch, regime="clean", frames=100, val_rmse=None,
                     offline={"rmse": offline * (1.2 if fed else 1.0)}, zeros={"rmse": 0.1},
                     closed={"success_rate": success, "recovery_rate": success, "on_policy_rmse": 0.1}, history=history)


def test_history_findings_follow_the_numbers_in_either_direction():
    from steerloop.evaluation.report import history_findings, history_table

    copycat = [_row("frames", fed=False, offline=0.05, success=0.9),
               _row("prev", fed=True, offline=0.008, success=0.2, probe_unexplained=0.02)]
    text = " ".join(history_findings(copycat))
    assert "Feeding back the previous command hurts in closed loop here, although it predicts better offline: " \
           "the copycat pattern." in text
    assert "1 of 2 policies beat it offline" in text and "prev (0.0080)" in text
    assert "prev (0.20)" in text  # steers more predictably from its own past than the expert (ratio 0.02 / 0.1)
    helpful = [_row("frames", fed=False, offline=0.05, success=0.3),
               _row("prev", fed=True, offline=0.04, success=0.8, probe_unexplained=0.9)]
    text = " ".join(history_findings(helpful))
    assert "Feeding back the previous command helps in closed loop here" in text and "copycat pattern (" in text
    assert "None of the 2 policies beats it offline" in text
    assert "No policy steers more predictably" in text
    assert "| prev | cnn-lstm | frames + prev_steering | teacher forcing | 16 |" in history_table(helpful)


def test_history_findings_compare_training_modes_and_sweep_lengths():
    from steerloop.evaluation.report import history_findings

    rows = [_row("teacher", fed=True, offline=0.01, success=0.4),
            _row("scheduled", fed=True, offline=0.02, success=0.7, mode="scheduled"),
            *[_row(f"t{t}", fed=False, offline=0.05, success=s, seq_len=t, recipe="sweep")
              for t, s in ((1, 0.2), (4, 0.5), (16, 0.9))]]
    text = " ".join(history_findings(rows))
    assert "Best in closed loop (success, then recovery): scheduled sampling, better than teacher forcing." in text
    assert "Success at T = 1: 0.20, 4: 0.50, 16: 0.90 (Spearman rho 1.00): longer windows drive better." in text
    rows[-1].closed["success_rate"] = 0.0
    rows[0].closed["success_rate"] = 0.9
    text = " ".join(history_findings(rows))
    assert "no remedy beats plain teacher forcing here" in text and "longer windows drive" in text
