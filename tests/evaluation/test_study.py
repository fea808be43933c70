"""The gap study: config checks, content-addressed caching, the report, and its statistics."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from steerloop.evaluation.cli import main
from steerloop.evaluation.stats import correlation_ci, pearson, spearman
from steerloop.evaluation.study import PRESETS, StudyError, load_study, plan_study

TINY = """
[study]
name = "tiny"
resolution = [24, 64]
suites = ["smoke"]
offline_data = "val"
threads = 1
short_loop = { rollouts = 3, horizon = 1.0, warmup = 0.5 }

[cells.train]
offline_data = "val"
suite = "smoke"

[cells.dusk]              # the mechanics of a second cell: other logs, the same suite
offline_data = "val-dusk"
suite = "smoke"

[datasets.clean]
episodes = 2
track_length = 60.0

[datasets.val]
suite = "val"
episodes = 1
track_length = 60.0

[datasets.val-dusk]
suite = "val"
episodes = 1
track_length = 60.0
conditions = ["dusk"]

[policies.pilotnet]
model = "pilotnet"
data = ["clean"]
epochs = 1
augment = []
crop_top = 4
input_size = [16, 48]
val_fraction = 0.5

[policies.lstm]
model = "cnn-lstm"
data = ["clean"]
seq_len = 4
epochs = 1
batch_frames = 32
augment = ["shift"]
crop_top = 4
input_size = [16, 48]
val_fraction = 0.5

[policies.dagger]
dagger = { init = "pilotnet", iterations = 1, episodes_per_iter = 1, beta_schedule = [0.0], epochs = 1, track_length = 60.0 }

[policies.lstm-prev]
model = "cnn-lstm"
inputs = ["image", "prev_steering"]
feedback_mode = "scheduled"
data = ["clean"]
seq_len = 4
epochs = 1
batch_frames = 32
augment = []
crop_top = 4
input_size = [16, 48]
val_fraction = 0.5
"""


def write_study(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    config = write_study(root)
    out = root / "out"
    assert main(["study", "--config", str(config), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    return config, out


# ----------------------------------------------------------------------------- end to end
def test_tiny_study_writes_the_report(tiny_study):
    _, out = tiny_study
    report = (out / "report.md").read_text()
    for needle in ("## Findings", "| pilotnet |", "| lstm |", "*all-zeros*", "Pearson r, Spearman ρ and Kendall τ", "inverted ",
                   "closed-loop rank", "figures/compounding.png", "figures/on_policy_vs_offline.png"):
        assert needle in report, f"report.md lacks {needle!r}"
    for figure in ("rmse_vs_success.png", "compounding.png", "on_policy_vs_offline.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
    summary = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in summary["policies"]] == ["pilotnet", "lstm", "dagger", "lstm-prev"]
    frames = {p["name"]: p["frames"] for p in summary["policies"]}
    assert frames["dagger"] > frames["pilotnet"], "DAgger's aggregate includes its init's data and its own"
    assert "## DAgger against behaviour cloning" in report and "(BC it started from)" in report
    for policy in summary["policies"]:
        assert policy["frames"] > 0
        assert 0.0 <= policy["closed_loop"]["success_rate"] <= 1.0
        assert policy["offline"]["rmse"] >= 0 and policy["zeros"]["rmse"] > 0
    assert 1 <= summary["best_offline_closed_loop_rank"] <= 4
    assert len(summary["correlations"]) == 11 * 4  # 8 offline + 3 short-loop x 4 closed-loop metrics on a plain suite
    for policy in summary["policies"]:
        assert policy["offline"]["balanced_mae"] > 0 and policy["offline"]["short_on_policy_rmse"] > 0
        assert 0 <= policy["offline"]["short_departure_rate"] <= 1
        cells = policy["cells"]
        assert cells["train"]["offline"] == policy["offline"] and cells["train"]["closed"] == policy["closed_loop"]
        assert cells["dusk"]["offline"]["rmse"] != policy["offline"]["rmse"]  # other logs
    for needle in ("## Short closed loop from logged states", "from the same 3 states", "## Per cell",
                   "**Cell `train`**: offline on `val`", "**Cell `dusk`**: offline on `val-dusk`", "short_final_offset_m",
                   "balanced_mae", "change_point_rmse"):
        assert needle in report, f"report.md lacks {needle!r}"
    history = {p["name"]: p["history"] for p in summary["policies"]}
    assert history["lstm-prev"]["fed_back"] and history["lstm-prev"]["mode"] == "scheduled"
    assert history["lstm-prev"]["teacher_forced"]["rmse"] > 0 and history["lstm"]["teacher_forced"] is None
    assert history["lstm"]["repeat_previous"]["rmse"] > 0 and history["lstm"]["probe"]["frames"] > 0
    for needle in ("## History and copycat", "repeat the previous executed command", "| lstm-prev | cnn-lstm | "
                   "frames + prev_steering | scheduled sampling | 4 |", "**The copycat's free offline score.**",
                   "**Teacher forced vs free running, offline.**", "**Does feeding back the previous command help?**"):
        assert needle in report, f"report.md lacks {needle!r}"


def test_rerunning_a_finished_study_does_nothing(tiny_study, capsys):
    config, out = tiny_study
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["study", "--config", str(config), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "0 to run" in printed and "nothing to do" in printed
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before, "a cached study must not touch any file"


def test_changing_one_policy_reruns_only_what_depends_on_it(tiny_study, tmp_path):
    config, out = tiny_study
    changed = write_study(tmp_path, TINY.replace("seq_len = 4", "seq_len = 2", 1))
    plan = plan_study(load_study(str(changed)), out)
    todo = [(s.kind, s.name) for s in plan.stages if not (out / "stages" / s.marker).exists()]
    assert todo == [("train", "lstm"), ("offline", "lstm"), ("offline", "lstm@val-dusk"), ("closed_loop", "lstm@smoke")]


def test_the_same_study_plans_the_same_keys(tmp_path):
    a = plan_study(load_study(str(write_study(tmp_path))), tmp_path / "a")
    b = plan_study(load_study(str(write_study(tmp_path))), tmp_path / "a")
    assert [s.key for s in a.stages] == [s.key for s in b.stages]


def test_dagger_policy_depends_on_its_init(tmp_path):
    text = TINY
    plan = plan_study(load_study(str(write_study(tmp_path, text))), tmp_path / "out")
    assert plan.policies["dagger"].kind == "dagger"
    assert plan.dataset_dirs("dagger")[-1].endswith("iter_00/data")
    reseeded = text.replace('[policies.pilotnet]\nmodel = "pilotnet"', '[policies.pilotnet]\nmodel = "pilotnet"\nseed = 3')
    plan2 = plan_study(load_study(str(write_study(tmp_path, reseeded))), tmp_path / "out")
    assert plan2.policies["dagger"].key != plan.policies["dagger"].key


def test_presets_parse():
    for preset in PRESETS:
        cfg = load_study(preset)
        assert len(cfg.policies) >= (12 if preset == "default" else 4)
        plan_study(cfg, "/tmp/unused-study-dir")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("epochs = 1\naugment = []", "epochs = 1\naugment = []\nepoch = 3"), "unknown key(s) ['epoch']"),
    (lambda t: t.replace('data = ["clean"]\nepochs = 1\naugment = []', 'data = ["nope"]\nepochs = 1\naugment = []'),
     "policies.pilotnet.data names 'nope'"),
    (lambda t: t.replace('offline_data = "val"', 'offline_data = "held"'), "study.offline_data names 'held'"),
    (lambda t: t.replace('suites = ["smoke"]', 'suites = ["nosuch"]'), "'nosuch' is neither a built-in suite"),
    (lambda t: t + '\n[policies.d]\ndagger = { init = "ghost" }\n', "dagger.init must name a policy defined above"),
    (lambda t: t.replace('model = "pilotnet"', 'model = "resnet"'), "[policies.pilotnet]: model must be one of"),
    (lambda t: t.replace("[study]", "[study\n"), "not valid TOML"),
    (lambda t: t.replace("horizon = 1.0", "horizon = 0.0"), "study.short_loop: horizon must be > 0 s, got 0.0"),
    (lambda t: t.replace("rollouts = 3", "rollout = 3"), "study.short_loop: unknown key(s) ['rollout']"),
    (lambda t: t.replace('suite = "smoke"', 'suite = "test"', 1), "[cells.train]: suite 'test' is not one of"),
    (lambda t: t.replace('offline_data = "val-dusk"', 'offline_data = "dusk"'), "cells.dusk.offline_data names 'dusk'"),
])
def test_bad_study_files_name_the_field(tmp_path, edit, message):
    path = write_study(tmp_path, edit(TINY))
    with pytest.raises(StudyError) as error:
        load_study(str(path))
    assert message in str(error.value) and str(path) in str(error.value)


def test_cli_bad_study_exits_2_without_writing(tmp_path, capsys):
    path = write_study(tmp_path, TINY.replace("epochs = 1\naugment = []", "epochs = 1\naugment = []\nepoch = 3"))
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key(s) ['epoch']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["study", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out")]) == 2


# ----------------------------------------------------------------------------- statistics
def test_pearson_and_spearman_match_hand_computed_values():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # mean x 2.5, mean y 3.75; sxy = 3.5, sxx = 5, syy = 4.75
    assert pearson(x, y) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    # ranks of y with ties averaged: [0, 1.5, 3, 1.5]
    assert spearman(x, y) == pytest.approx(pearson([0, 1, 2, 3], [0, 1.5, 3, 1.5]))
    assert spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [-1, -2, -3]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = x + 0.5 * rng.normal(size=12)
    first, second = correlation_ci(x, y, pearson), correlation_ci(x, y, pearson)
    assert first == second
    r, lo, hi = first
    assert lo <= r <= hi and -1 <= lo and hi <= 1
    assert all(math.isnan(v) for v in correlation_ci(x, np.ones(12), pearson))


@pytest.mark.slow
def test_ray_backend_gives_the_same_study(tiny_study, tmp_path, ray_local):
    config, local_out = tiny_study
    out = tmp_path / "ray"
    assert main(["study", "--config", str(config), "--out", str(out), "--workers", "2", "--quiet",
                 "--backend", "ray"]) == 0
    assert json.loads((out / "report.json").read_text()) == json.loads((local_out / "report.json").read_text())
