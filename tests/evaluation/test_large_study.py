"""The large preset (studies/large.toml) end to end on a local Ray instance, shrunk to a tiny scale."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from steerloop.evaluation.study import PRESETS_DIR, parse_study, plan_study, run_study

TINY_TRACK = 60.0  # [m] routes of every dataset and DAgger iteration (~140 frames)
TINY_SUITES = {  # one scenario each: new track; held-out condition; perturbations; interventions
    "tiny-test": {"tracks": [200000], "track_length": 60.0},
    "tiny-generalization": {"tracks": [200000], "conditions": ["dusk"], "track_length": 60.0},
    "tiny-recovery": {"tracks": [200001], "perturbations": "standard", "track_length": 100.0},
    "tiny-interventions": {"tracks": [200002], "interventions": True, "track_length": 60.0},
}


def shrink(raw: dict, suites_dir: Path) -> dict:
    """The large preset at a tiny scale: 24x64 camera, every dataset 2 episodes (the fewest a
    training split takes) of 60 m, 1 epoch (each checkpoint run keeps epoch 1), one 1-scenario
    suite per suite of the preset (the cells use the tiny ones), 2 short closed-loop rollouts of
    1 s, DAgger 1 iteration of 1 episode. Every policy is kept."""
    suites = []
    for name, spec in TINY_SUITES.items():
        path = suites_dir / f"{name}.json"
        path.write_text(json.dumps({"name": name, **spec}))
        suites.append(str(path))
    assert len(suites) == len(raw["study"]["suites"]), "one tiny suite per suite of the preset"
    study = {**raw["study"], "suites": suites, "resolution": [24, 64], "threads": 1,
             "short_loop": {"rollouts": 2, "horizon": 1.0, "warmup": 0.5}}
    cells = {name: {**cell, "suite": suites[raw["study"]["suites"].index(cell["suite"])]}
             for name, cell in raw.get("cells", {}).items()}
    datasets = {name: {**table, "episodes": 2, "track_length": TINY_TRACK} for name, table in raw["datasets"].items()}
    policies = {}
    for name, table in raw["policies"].items():
        table = dict(table)
        if "dagger" in table:
            table["dagger"] = {**table["dagger"], "iterations": 1, "episodes_per_iter": 1, "beta_schedule": [0.0],
                               "epochs": 1, "track_length": TINY_TRACK}
        else:
            table.update(epochs=1, patience=1, crop_top=4, input_size=[16, 48], val_fraction=0.5, hidden=16,
                         encoder_epochs=1)
            if table.get("model") != "chauffeur":
                table.pop("encoder_epochs")
            if "checkpoints" in table:
                table["checkpoints"] = [1]
        policies[name] = table
    return {"study": study, "cells": cells, "datasets": datasets, "policies": policies}


@pytest.mark.slow
def test_large_preset_runs_on_ray_at_a_tiny_scale(tmp_path, ray_local):
    """studies/large.toml shrunk (see ``shrink``) and run with ``--backend ray`` on a local Ray
    instance (2 CPUs): every dataset, every suite (as one tiny scenario each) and all 39
    training runs of the preset (every architecture, fed-back model and training mode, data
    amount, augmentation, side cameras, DART, DAgger); with 1 epoch each checkpoint run keeps
    only its epoch-1 checkpoint, so 43 policies of the preset's 54. The report lists every
    policy and study.json every stage, each finished and none skipped."""
    preset = PRESETS_DIR / "large.toml"
    raw = tomllib.loads(preset.read_text())
    cfg = parse_study(shrink(raw, tmp_path), preset)
    runs = [name for name, spec in cfg.policies.items() if spec.checkpoint is None]
    checkpoint_runs = [name for name, table in raw["policies"].items() if "checkpoints" in table]
    assert runs == list(raw["policies"]) and len(runs) == 39 and len(checkpoint_runs) == 4
    assert len(cfg.policies) == 39 + 4
    out = tmp_path / "out"
    run_study(cfg, out, workers=2, progress=False, backend="ray")
    plan = plan_study(cfg, out)
    report = (out / "report.md").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in summary["policies"]] == list(cfg.policies)
    for name in cfg.policies:
        assert f"| {name} |" in report, f"report.md lacks {name}"
    assert "| pilotnet-c16-e01 | pilotnet-c16 @ epoch 1 |" in report and summary["missing_checkpoints"] == []
    assert "## Per cell" in report and all(set(p["cells"]) == set(cfg.cells) for p in summary["policies"])
    study = json.loads((out / "study.json").read_text())
    assert study["stages"] == [{"kind": s.kind, "name": s.name, "key": s.key, "out": str(s.out)} for s in plan.stages]
    held_out = {cfg.offline_data, *(cell["offline_data"] for cell in cfg.cells.values())}
    assert len(cfg.cells) == 2 and len(held_out) == 2, "Codevilla's two cells, each with its held-out logs"
    assert len(plan.stages) == len(raw["datasets"]) + 39 + 43 * (len(held_out) + len(TINY_SUITES))
    for stage in plan.stages:
        marker = json.loads((out / "stages" / stage.marker).read_text())
        assert marker["key"] == stage.key and "skipped" not in marker["summary"], stage.name
