"""The closed-loop runner (evaluation.runner and ``steerloop evaluate``): results layout,
worker-count independence, refusal of a different run, interventions and recovery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from steerloop.agents import load_policy
from steerloop.evaluation.metrics import autonomy_percent
from steerloop.evaluation.rollout import TRAJECTORY_KEYS
from steerloop.evaluation.runner import (RESULTS_SCHEMA_VERSION, ResultsError, aggregate, evaluate, lockstep_groups,
                               run_scenario)
from steerloop.evaluation.suites import Scenario, Suite, load_suite, load_suite_file
from steerloop.sim.wrappers import Perturbation

from helpers import SHORT_SPEC, straight_spec

TINY = (16, 32)


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerloop", *args], capture_output=True, text=True,
                          timeout=timeout)


def tree(path: Path) -> dict:
    """Every file under ``path`` -> (bytes, mtime_ns)."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("n, batch, sizes", [
    (20, 4, [4, 4, 3, 3, 3, 3]),  # 5 groups of 4 would split 3:2 over two workers
    (16, 4, [4, 4, 4, 4]),
    (10, 4, [3, 3, 2, 2]),
    (3, 4, [2, 1]),
    (1, 4, [1]),
    (20, 2, [2] * 10),
    (7, 1, [1] * 7),
    (0, 4, []),
])
def test_lockstep_groups_are_even_in_number_and_balanced(n, batch, sizes):
    groups = lockstep_groups(n, batch)
    assert [len(g) for g in groups] == sizes
    assert [i for g in groups for i in g] == list(range(n))  # every scenario once, in order


@pytest.fixture(scope="module")
def smoke_expert(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "expert-smoke"
    results = evaluate("expert", load_suite("smoke"), out, resolution=TINY, progress=False)
    return out, results


# ----------------------------------------------------------------------------- results
def test_expert_drives_the_smoke_suite(smoke_expert):
    _, results = smoke_expert
    agg = results["aggregate"]
    assert agg["success_rate"] == 1.0
    assert agg["departures_per_km"] == 0.0
    assert agg["route_completion"] == 1.0
    assert 0.0 <= agg["mean_abs_offset_m"] < 0.2
    assert agg["on_policy_rmse"] < 1e-4  # the expert is its own label
    assert agg["scenarios"] == 3
    assert all(s["metrics"]["success"] for s in results["scenarios"])


def test_results_json_layout(smoke_expert):
    out, results = smoke_expert
    stored = json.loads((out / "results.json").read_text())
    assert stored == json.loads(json.dumps(results))
    for key in ("schema_version", "policy", "suite", "seeds", "software", "scenarios", "aggregate"):
        assert key in stored, key
    assert stored["schema_version"] == RESULTS_SCHEMA_VERSION
    assert stored["policy"]["name"] == "expert" and stored["policy"]["kind"] == "expert"
    assert stored["suite"] == "smoke"
    suite = load_suite("smoke")
    assert stored["seeds"] == [s.seed for s in suite.scenarios]
    assert stored["resolution"] == list(TINY)
    assert "python" in stored["software"] and "numpy" in stored["software"]
    assert [s["name"] for s in stored["scenarios"]] == [s.name for s in suite.scenarios]
    for entry in stored["scenarios"]:
        for key in ("name", "track", "condition", "seed", "metrics"):
            assert key in entry
    agg = stored["aggregate"]
    for key in ("success_rate", "mean_abs_offset_m", "departures_per_km", "on_policy_rmse"):
        assert isinstance(agg[key], float), key
        lo, hi = agg[f"{key}_ci95"]
        assert lo <= agg[key] <= hi, key
    assert "recovery_rate" not in agg and "autonomy_pct" not in agg  # the smoke suite has neither


def test_per_scenario_files(smoke_expert):
    out, results = smoke_expert
    suite = load_suite("smoke")
    for scenario, entry in zip(suite.scenarios, results["scenarios"]):
        record = json.loads((out / "scenarios" / f"{scenario.name}.json").read_text())
        assert record["metrics"] == entry["metrics"]
        assert record["scenario"] == json.loads(json.dumps(scenario.to_dict()))
        with np.load(out / "trajectories" / f"{scenario.name}.npz", allow_pickle=False) as npz:
            assert set(TRAJECTORY_KEYS) <= set(npz.files)
            lengths = {len(npz[key]) for key in npz.files}
            assert lengths == {entry["metrics"]["steps"]}
            offset = npz["lateral_offset"]
            assert offset.dtype.kind == "f"
            assert float(np.abs(offset).mean()) == pytest.approx(entry["metrics"]["mean_abs_offset_m"])
            assert np.all(np.diff(npz["progress"]) > 0)
    assert not list(out.rglob("*.tmp"))


def test_rerun_into_the_same_directory_resumes_without_rerunning(smoke_expert):
    out, results = smoke_expert
    before = tree(out / "trajectories")
    again = evaluate("expert", load_suite("smoke"), out, resolution=TINY, progress=False)
    assert again == results
    assert tree(out / "trajectories") == before  # nothing was re-driven


def test_aggregate_is_the_mean_over_scenarios(smoke_expert):
    _, results = smoke_expert
    metrics = [s["metrics"] for s in results["scenarios"]]
    agg = aggregate(metrics, load_suite("smoke"))
    assert agg == results["aggregate"]
    assert agg["mean_abs_offset_m"] == pytest.approx(np.mean([m["mean_abs_offset_m"] for m in metrics]))


def test_workers_do_not_change_the_results(smoke_expert, tmp_path):
    out1, _ = smoke_expert
    out2 = tmp_path / "w2"
    results2 = evaluate("expert", load_suite("smoke"), out2, resolution=TINY, progress=False, workers=2)
    r1 = json.loads((out1 / "results.json").read_text())
    r2 = json.loads((out2 / "results.json").read_text())
    assert r1["aggregate"] == r2["aggregate"]
    assert [s["metrics"] for s in r1["scenarios"]] == [s["metrics"] for s in r2["scenarios"]]
    assert r1 == r2
    assert (out1 / "results.json").read_bytes() == (out2 / "results.json").read_bytes()
    for name in (s["name"] for s in results2["scenarios"]):
        with np.load(out1 / "trajectories" / f"{name}.npz") as a, np.load(out2 / "trajectories" / f"{name}.npz") as b:
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")


def _same_results(out1: Path, out2: Path) -> None:
    r1, r2 = (json.loads((out / "results.json").read_text()) for out in (out1, out2))
    assert [s["metrics"] for s in r1["scenarios"]] == [s["metrics"] for s in r2["scenarios"]]
    assert r1["aggregate"] == r2["aggregate"]
    for name in (s["name"] for s in r1["scenarios"]):
        with np.load(out1 / "trajectories" / f"{name}.npz") as a, np.load(out2 / "trajectories" / f"{name}.npz") as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")


@pytest.mark.slow  # ~10 s of Ray start-up; keeps the default suite under 4 min (bench scale and the large study's Ray test are slow too)
def test_ray_backend_gives_the_same_results(smoke_expert, tmp_path, ray_local):
    out1, _ = smoke_expert
    evaluate("expert", load_suite("smoke"), tmp_path / "ray", resolution=TINY, progress=False, workers=2,
             backend="ray")
    _same_results(out1, tmp_path / "ray")
    assert (out1 / "results.json").read_bytes() == (tmp_path / "ray" / "results.json").read_bytes()


@pytest.mark.slow  # test_ray_backend_gives_the_same_results covers Ray in the default suite
def test_ray_backend_gives_a_learned_policy_bit_identical_results(tmp_path, ray_local):
    import torch

    from steerloop.agents.checkpoint import save_checkpoint
    from steerloop.agents.models import ModelConfig, build_model
    from steerloop.agents.preprocess import PreprocessConfig

    torch.manual_seed(0)
    config = ModelConfig(arch="cnn-lstm", preprocess=PreprocessConfig(crop_top=4, resize=(20, 40)))
    checkpoint = save_checkpoint(tmp_path / "ckpt", build_model(config), config, {"note": "untrained"})
    suite = Suite("two", tuple(Scenario(name=f"short-{i}", track=SHORT_SPEC, seed=i) for i in range(2)))
    for backend in ("local", "ray"):
        evaluate(str(checkpoint), suite, tmp_path / backend, resolution=TINY, progress=False, plots=False,
                 workers=2, batch=1, backend=backend)
    _same_results(tmp_path / "local", tmp_path / "ray")


def test_zeros_departs_on_a_curvy_scenario():
    scenario = load_suite("smoke").scenarios[2]  # the s-bend
    assert scenario.track["name"] == "s-bend"
    metrics, trajectory = run_scenario(load_policy("zeros"), scenario, resolution=TINY)
    assert metrics["success"] is False
    assert metrics["departures"] >= 1
    assert metrics["route_completion"] < 1.0
    assert np.all(trajectory["steering"] == 0)
    assert metrics["on_policy_rmse"] > 0


def test_a_results_dir_holding_a_different_run_is_refused(smoke_expert):
    out, _ = smoke_expert
    before = tree(out)
    with pytest.raises(ResultsError, match="different run") as error:
        evaluate("zeros", load_suite("smoke"), out, resolution=TINY, progress=False)
    assert str(out) in str(error.value)
    with pytest.raises(ResultsError):
        evaluate("expert", load_suite("smoke"), out, resolution=(24, 48), progress=False)
    assert tree(out) == before


def test_a_foreign_results_json_is_refused(tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}')
    with pytest.raises(ResultsError):
        evaluate("zeros", load_suite("smoke"), out, resolution=TINY, progress=False)
    assert (out / "results.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_unknown_policy_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown policy"):
        evaluate(str(tmp_path / "nonexistent"), load_suite("smoke"), tmp_path / "out", resolution=TINY,
                 progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- interventions, recovery
@pytest.fixture
def short_track_dir(tmp_path) -> Path:
    (tmp_path / "short.json").write_text(json.dumps(SHORT_SPEC))
    (tmp_path / "straight.json").write_text(json.dumps(straight_spec(150.0)))
    return tmp_path


def test_interventions_suite_reports_autonomy(short_track_dir):
    path = short_track_dir / "interventions.json"
    path.write_text(json.dumps({"name": "iv", "tracks": ["short.json"], "interventions": True}))
    suite = load_suite_file(path)
    results = evaluate("zeros", suite, short_track_dir / "out", resolution=TINY, progress=False)
    agg = results["aggregate"]
    (entry,) = results["scenarios"]
    metrics = entry["metrics"]
    assert metrics["interventions"] >= 1  # driving straight into the arc needs the safety driver
    assert metrics["autonomy_pct"] == pytest.approx(autonomy_percent(metrics["interventions"],
                                                                     metrics["duration_s"]))
    assert 0.0 <= agg["autonomy_pct"] < 100.0
    assert agg["autonomy_pct"] == pytest.approx(metrics["autonomy_pct"])
    assert agg["interventions"] == metrics["interventions"]
    assert "autonomy_pct_ci95" in agg and "recovery_rate" not in agg
    assert metrics["steps"] > 100  # the car was put back every time and drove on
    with np.load(short_track_dir / "out" / "trajectories" / f"{entry['name']}.npz") as npz:
        assert int(npz["intervention"].sum()) == metrics["interventions"]
        # the logged offset is the one that triggered the intervention (> 1 m)
        assert np.all(np.abs(npz["lateral_offset"][npz["intervention"].astype(bool)]) > 1.0)


def test_expert_needs_no_interventions():
    scenario = Scenario(name="iv-expert", track=SHORT_SPEC, interventions=True, seed=1)
    metrics, _ = run_scenario(load_policy("expert"), scenario, resolution=TINY)
    assert metrics["interventions"] == 0 and metrics["autonomy_pct"] == 100.0


def test_perturbation_suite_reports_recovery(short_track_dir):
    path = short_track_dir / "recovery.json"
    path.write_text(json.dumps({
        "name": "rec", "tracks": ["straight.json"],
        "perturbations": [{"kind": "lateral_push", "start_step": 20, "magnitude": 0.5, "duration": 25},
                          {"kind": "steering_pulse", "start_step": 150, "magnitude": -0.3, "duration": 5}]}))
    suite = load_suite_file(path)
    results = evaluate("expert", suite, short_track_dir / "out", resolution=TINY, progress=False)
    agg = results["aggregate"]
    (entry,) = results["scenarios"]
    events = entry["metrics"]["recovery_events"]
    assert [e["kind"] for e in events] == ["lateral_push", "steering_pulse"]
    assert all(e["reached"] for e in events)
    assert entry["metrics"]["recovery_rate"] == 1.0
    # the steps a perturbation overrode the policy do not count against it: the expert is its own label
    assert entry["metrics"]["on_policy_rmse"] < 1e-4
    assert agg["recovery_rate"] == 1.0 and agg["perturbations"] == 2
    assert agg["recovery_rate_ci95"] == [1.0, 1.0]
    assert agg["median_recovery_time_s"] is not None and 0.0 <= agg["median_recovery_time_s"] <= 5.0
    assert agg["mean_overshoot_m"] is not None and agg["mean_overshoot_m"] >= 0.0
    assert "autonomy_pct" not in agg
    with np.load(short_track_dir / "out" / "trajectories" / f"{entry['name']}.npz") as npz:
        phase = npz["perturbation_phase"]
        assert np.all(phase[19:44] == 1)  # acting on steps 20..44 = trajectory indices 19..43
        assert phase[44] == 2 and phase[18] == 0
        # the push displaced the car by ~0.5 m to the left
        assert npz["lateral_offset"][43] == pytest.approx(0.5, abs=0.1)


def test_zeros_does_not_recover_on_a_curve():
    scenario = Scenario(name="rec-zeros", track=SHORT_SPEC, seed=2,
                        perturbations=(Perturbation("lateral_push", 10, 0.5, 25),))
    suite = Suite("rec-zeros", (scenario,))
    metrics, _ = run_scenario(load_policy("zeros"), scenario, resolution=TINY)
    assert metrics["recovery_rate"] == 0.0
    assert aggregate([metrics], suite)["recovery_rate"] == 0.0


# ----------------------------------------------------------------------------- command line
def test_cli_evaluate_prints_the_summary(tmp_path):
    out = tmp_path / "cli"
    result = cli("evaluate", "--policy", "zeros", "--suite", "smoke", "--out", str(out), "--resolution", "16x32",
                 "--quiet")
    assert result.returncode == 0, result.stderr
    assert "success rate" in result.stdout
    assert "zeros on smoke (3 scenarios" in result.stdout
    assert str(out / "results.json") in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["aggregate"]["success_rate"] == 0.0  # driving straight leaves every smoke route


def test_cli_evaluate_unknown_policy(tmp_path):
    result = cli("evaluate", "--policy", "/nonexistent", "--suite", "smoke", "--out", str(tmp_path / "o"),
                 "--resolution", "16x32", "--quiet")
    assert result.returncode != 0
    assert "/nonexistent" in result.stderr and "unknown policy" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_evaluate_unknown_suite(tmp_path):
    result = cli("evaluate", "--policy", "zeros", "--suite", "nosuch", "--out", str(tmp_path / "o"),
                 "--resolution", "16x32", "--quiet")
    assert result.returncode != 0
    assert "nosuch" in result.stderr and "smoke" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_evaluate_refuses_a_different_run(smoke_expert):
    out, _ = smoke_expert
    before = tree(out)
    result = cli("evaluate", "--policy", "zeros", "--suite", "smoke", "--out", str(out), "--resolution", "16x32",
                 "--quiet")
    assert result.returncode != 0
    assert "different run" in result.stderr and "Traceback" not in result.stderr
    assert tree(out) == before
