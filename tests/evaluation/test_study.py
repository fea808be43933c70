"""The gap study: config checks, content-addressed caching, the report, and its statistics."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from steerloop.evaluation.cli import main
from steerloop.evaluation.stats import correlation_ci, pearson, spearman
from steerloop.evaluation import study as study_module
from steerloop.evaluation.report.write import checkpoint_note
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
checkpoints = [1]

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
    assert [p["name"] for p in summary["policies"]] == ["pilotnet", "pilotnet-e01", "lstm", "dagger", "lstm-prev"]
    frames = {p["name"]: p["frames"] for p in summary["policies"]}
    assert frames["dagger"] > frames["pilotnet"], "DAgger's aggregate includes its init's data and its own"
    assert "## DAgger against behaviour cloning" in report and "(BC it started from)" in report
    for policy in summary["policies"]:
        assert policy["frames"] > 0
        assert 0.0 <= policy["closed_loop"]["success_rate"] <= 1.0
        assert policy["offline"]["rmse"] >= 0 and policy["zeros"]["rmse"] > 0
    assert 1 <= summary["best_offline_closed_loop_rank"] <= 5
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
        assert len(cfg.policies) >= {"default": 12, "large": 48}.get(preset, 4)
        plan = plan_study(cfg, "/tmp/unused-study-dir")
        if preset == "large":  # Codevilla's population: architectures, data amounts, recipes, checkpoints
            kinds = {stage.kind for stage in plan.policies.values()}
            archs = {stage.params["config"].get("model") for stage in plan.policies.values() if stage.kind == "train"}
            assert kinds == {"train", "dagger", "checkpoint"}
            assert archs == {"pilotnet", "cnn-lstm", "conv3d-lstm", "komanda", "chauffeur"}
            assert set(plan.suites) == {"test", "generalization", "recovery-10", "interventions-10"}


# ----------------------------------------------------------------------------- checkpoints along training
# The record, train and DAgger stage keys of the presets: sha256 of "kind:name:key" lines, first
# 16 hex digits. Equal keys keep existing study caches valid. Pinned on main (2b4bfb5) before
# checkpoints existed, and again when `default` gained texture and scenery (every record key
# now holds the world digest of its conditions, so caches of the old flat look are not reused;
# the default preset gained the val-new dataset of its held-out cell).
POPULATION_KEYS = {"default": "07203ec7529053ad", "demo": "57a7beee347ac0c0", "history": "ec641780eb1ce7f0"}


def test_presets_without_checkpoints_keep_their_stage_keys():
    for preset, digest in POPULATION_KEYS.items():
        plan = plan_study(load_study(preset), "/tmp/unused-study-dir")
        assert all("keep_epochs" not in s.params["config"] for s in plan.policies.values() if s.kind == "train")
        population = [f"{s.kind}:{s.name}:{s.key}" for s in plan.stages if s.kind in ("record", "train", "dagger")]
        assert hashlib.sha256("\n".join(population).encode()).hexdigest()[:16] == digest, preset


def test_checkpoints_change_only_their_runs_train_key(tmp_path):
    with_them = plan_study(load_study(str(write_study(tmp_path, TINY))), tmp_path / "out")
    without = plan_study(load_study(str(write_study(tmp_path, TINY.replace("checkpoints = [1]\n", "")))),
                         tmp_path / "out")
    assert "keep_epochs" not in without.policies["pilotnet"].params["config"]
    changed = {name for name, stage in without.policies.items() if stage.key != with_them.policies[name].key}
    assert changed == {"pilotnet", "dagger"}, "the run, and the DAgger that starts from it"
    assert list(with_them.policies) == ["pilotnet", "pilotnet-e01", "lstm", "dagger", "lstm-prev"]
    assert len(with_them.stages) == len(without.stages) + 3  # the checkpoint's two offline (2 cells) and closed-loop stages


def test_checkpoint_policies_are_evaluated_like_any_other(tiny_study):
    config, out = tiny_study
    plan = plan_study(load_study(str(config)), out)
    run = plan.policies["pilotnet"].out
    assert plan.policies["pilotnet"].params["config"]["keep_epochs"] == [1]
    assert plan.checkpoint("pilotnet-e01") == str(run / "epoch_01")
    assert plan.dataset_dirs("pilotnet-e01") == plan.dataset_dirs("pilotnet")
    assert [(s.kind, s.name) for s in plan.stages if s.name.startswith("pilotnet-e01")] == \
        [("offline", "pilotnet-e01"), ("offline", "pilotnet-e01@val-dusk"), ("closed_loop", "pilotnet-e01@smoke")]
    # one epoch: the kept checkpoint is the best one, so it scores exactly as its run does
    assert (run / "epoch_01" / "model.safetensors").read_bytes() == (run / "best" / "model.safetensors").read_bytes()
    summary = json.loads((out / "report.json").read_text())
    policies = {p["name"]: p for p in summary["policies"]}
    assert policies["pilotnet-e01"]["offline"] == policies["pilotnet"]["offline"]
    assert policies["pilotnet-e01"]["closed_loop"] == policies["pilotnet"]["closed_loop"]
    assert {name: (p["run"], p["epoch"]) for name, p in policies.items()} == {
        "pilotnet": ("pilotnet", None), "pilotnet-e01": ("pilotnet", 1), "lstm": ("lstm", None),
        "dagger": ("dagger", None), "lstm-prev": ("lstm-prev", None)}
    report = (out / "report.md").read_text()
    assert "| policy | run | family |" in report and "| pilotnet-e01 | pilotnet @ epoch 1 | pilotnet |" in report
    assert "The 5 policies come from 4 training runs" in report and summary["missing_checkpoints"] == []


def test_a_checkpoint_early_stopping_never_wrote_is_skipped(tmp_path, monkeypatch):
    """The run stops after epoch 2 of 3: its epoch_03 policy's stages are recorded as skipped
    (nothing runs them), the log says why, and the report notes it."""
    text = TINY.replace('data = ["clean"]\nepochs = 1', 'data = ["clean"]\nepochs = 3', 1)
    text = text.replace("checkpoints = [1]", "checkpoints = [1, 3]")
    cfg = load_study(str(write_study(tmp_path, text)))
    ran = []

    def fake_stage(plan, stage, **_):
        ran.append((stage.kind, stage.name))
        if (stage.kind, stage.name) == ("train", "pilotnet"):  # early stopping after epoch 2
            (stage.out / "epoch_01").mkdir(parents=True)
            (stage.out / "epoch_01" / "config.json").write_text("{}")
            (stage.out / "trainer_state").mkdir()
            (stage.out / "trainer_state" / "progress.json").write_text(json.dumps({"epoch": 2}))
        return {}

    monkeypatch.setattr(study_module, "_run_stage", fake_stage)
    monkeypatch.setattr("steerloop.evaluation.report.write_report", lambda plan: None)
    lines = []
    study_module.run_study(cfg, tmp_path / "out", log=lines.append)
    reason = ("pilotnet-e03: pilotnet stopped early after epoch 2 (patience 3), so epoch 3 was never reached; "
              "raise patience to epochs to keep every checkpoint")
    assert ("offline", "pilotnet-e01") in ran and ("closed_loop", "pilotnet-e01@smoke") in ran
    assert not [r for r in ran if r[1].startswith("pilotnet-e03")]
    assert lines.count(f"  skipped: {reason}") == 3  # offline in both cells and closed loop
    plan = plan_study(cfg, tmp_path / "out")
    for stage in (plan.offline["pilotnet-e03"], plan.closed_loop[("pilotnet-e03", "smoke")]):
        marker = json.loads((tmp_path / "out" / "stages" / stage.marker).read_text())
        assert marker["summary"] == {"skipped": reason}
    assert plan.missing_checkpoint("pilotnet-e03") == reason and plan.missing_checkpoint("pilotnet-e01") is None
    assert f"- {reason}" in checkpoint_note([], [reason])


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
    (lambda t: t.replace("checkpoints = [1]", "checkpoints = [0, 2]"),
     "[policies.pilotnet]: checkpoints: epoch(s) [0, 2] outside 1..epochs (1..1)"),
    (lambda t: t.replace("checkpoints = [1]", "checkpoints = 1"), "checkpoints must be a list of epochs"),
    (lambda t: t.replace("checkpoints = [1]", "keep_epochs = [1]"), "unknown key(s) ['keep_epochs']"),
    (lambda t: t + '\n[policies.pilotnet-e01]\nmodel = "pilotnet"\ndata = ["clean"]\n',
     "its policy 'pilotnet-e01' clashes with [policies.pilotnet-e01]"),
    (lambda t: t.replace('init = "pilotnet"', 'init = "pilotnet-e01"'), "a checkpoint along 'pilotnet''s training"),
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
