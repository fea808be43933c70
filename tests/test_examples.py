"""examples/own_model on a tiny budget, as its README runs it: a user's own torch model trained by
their own loop on a steerloop driving log read with plain h5py, evaluated in closed loop by its
spec with 2 workers, gated against the expert, and (slow) put in a study beside two steerloop
models."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from steerloop.evaluation.cli import main
from steerloop.evaluation.report.rows import PREDICTORS

from helpers import SHORT_SPEC

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"
RES = "16x32"
TRAIN_STEPS = "40"  # optimiser steps: enough to run the loop, not to drive well


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A copy of the example with a 1-episode log recorded at 16x32 and the model trained on it."""
    root = tmp_path_factory.mktemp("example") / "own_model"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    (root / "short.json").write_text(json.dumps(SHORT_SPEC))
    (root / "suite.json").write_text(json.dumps({"name": "tiny", "tracks": ["short.json"],
                                                 "conditions": ["default", "dusk"]}))
    assert main(["record", "--out", str(root / "data"), "--episodes", "1", "--track", str(root / "short.json"),
                 "--resolution", RES, "--quiet"]) == 0
    # The user's script as they run it (python train.py DATA OUT STEPS), in this interpreter: torch is loaded already.
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(root / "train.py"), str(root / "data"), str(root / "tiny.safetensors"), TRAIN_STEPS], \
        [str(root)]
    try:
        runpy.run_path(str(root / "train.py"), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
        sys.modules.pop("model", None)
    assert (root / "tiny.safetensors").stat().st_size > 1000
    return root


def test_the_users_loop_is_short_and_reads_the_log_with_plain_h5py():
    train = (EXAMPLE / "train.py").read_text()
    imports = [line for line in train.splitlines() if line.startswith(("import ", "from "))]
    assert "import h5py" in imports and not any("steerloop" in line for line in imports)
    assert len(train.splitlines()) <= 50


def test_the_trained_example_drives_by_its_spec(trained, capsys):
    spec, kwargs = f"{trained / 'model.py'}:load", json.dumps({"weights": str(trained / "tiny.safetensors")})
    assert main(["drive", "--policy", spec, "--policy-kwargs", kwargs, "--track", str(trained / "short.json"),
                 "--resolution", RES, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"] == spec and summary["steps"] > 10


@pytest.mark.slow  # two worker processes and three closed-loop evaluations (~1 min on 2 busy cores)
def test_the_example_evaluates_with_two_workers_and_is_gated_against_the_expert(trained, capsys):
    spec, kwargs = f"{trained / 'model.py'}:load", json.dumps({"weights": str(trained / "tiny.safetensors")})
    out = trained / "eval"
    assert main(["evaluate", "--policy", spec, "--policy-kwargs", kwargs, "--suite", str(trained / "suite.json"),
                 "--out", str(out), "--workers", "2", "--resolution", RES, "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["policy"]["name"] == spec and results["policy"]["class"] == "TinyNet"
    assert results["policy"]["preprocess"]["resize"] == [32, 64] and results["aggregate"]["scenarios"] == 2
    capsys.readouterr()
    code = main(["regress", "--policy", spec, "--policy-kwargs", kwargs, "--baseline", "expert", "--suite",
                 str(trained / "suite.json"), "--resolution", RES, "--out", str(trained / "gate"), "--quiet"])
    printed = capsys.readouterr()
    assert code in (0, 1), printed.err
    assert f"candidate {spec} vs baseline expert on tiny (2 scenarios" in printed.out and "verdict:" in printed.out
    (run,) = (trained / "gate").glob("*model.py_load-tiny-*")
    gated = json.loads((run / "results.json").read_text())
    assert gated["scenarios"] == results["scenarios"], "the gate drove the model exactly as evaluate did"


TINY_STUDY = [  # (text in examples/own_model/study.toml, its tiny-budget replacement)
    ('suites = ["test"]', 'suites = ["suite.json"]\nresolution = [16, 32]\nthreads = 1'),
    ("[datasets.clean]\nepisodes = 8", "[datasets.clean]\nepisodes = 2\ntrack_length = 60.0"),
    ("[datasets.val]\nsuite = \"val\"\nepisodes = 3",
     "[datasets.val]\nsuite = \"val\"\nepisodes = 1\ntrack_length = 60.0"),
    ("augment = []\nepochs = 3", "augment = []\nepochs = 1\ncrop_top = 4\ninput_size = [16, 48]\nval_fraction = 0.5\n"
                                 "batch_frames = 32"),
]


@pytest.mark.slow  # records two datasets and trains two steerloop models (~1-2 min on 2 cores)
def test_the_example_study_puts_the_users_model_beside_two_steerloop_models(trained):
    config = trained / "study.toml"
    text = config.read_text()
    for old, new in TINY_STUDY:
        assert old in text, f"examples/own_model/study.toml changed: update TINY_STUDY ({old!r})"
        text = text.replace(old, new)
    config.write_text(text)
    out = trained / "study"
    assert main(["study", "--config", str(config), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in summary["policies"]] == ["pilotnet", "cnn-lstm", "mine"]
    mine = summary["policies"][2]
    assert mine["family"] == "mine" and mine["regime"] == "user" and mine["offline"]["rmse"] > 0
    report = (out / "report.md").read_text()
    assert "| mine | mine | user | n/a |" in report
    # every predictor against the 4 closed-loop metrics of a plain suite, each over all three policies
    assert len(summary["correlations"]) == len(PREDICTORS) * 4
    assert all(c["n"] == 3 for c in summary["correlations"])  # every correlation includes the user's model
