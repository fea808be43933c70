"""Bad input at the command line: one line on stderr naming the input and the fix, exit 2,
no traceback, nothing written. One test per kind of mistake a user makes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import SHORT_SPEC

REFERENCE_CHECKPOINT = Path(__file__).resolve().parents[1] / "reference" / "cnn-lstm-tiny"


def _run(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerloop", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _assert_user_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one stderr line, no traceback, and it names every one of ``words``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-1500:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-1500:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "short.json").write_text(json.dumps(SHORT_SPEC))
    return tmp_path


def _entries(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


FLAG_CASES = [
    (("evaluate", "--policy", "expert", "--suite", "smoke", "--out", "a-file"), ("--out", "a-file", "is a file")),
    (("evaluate", "--policy", "expert", "--suite", "smoke", "--out", "a-file/sub"), ("--out", "under a-file")),
    (("evaluate", "--policy", "expert", "--suite", "smoke", "--out", ""), ("--out", "empty")),
    (("evaluate", "--policy", "expert", "--suite", "smoke", "--out", "o", "--workers", "0"), ("--workers", ">= 1")),
    (("evaluate", "--policy", "expert", "--suite", "smoke", "--out", "o", "--workers", "-1"), ("--workers", "-1")),
    (("evaluate", "--policy", "expert", "--suite", "smoke", "--out", "o", "--video", "-1"), ("--video", ">= 0")),
    (("train", "--data", "d", "--out", "o", "--threads", "0"), ("--threads", ">= 1")),
    (("train", "--data", "d", "--out", "o", "--seq-len", "-3"), ("--seq-len", ">= 0")),
    (("drive", "--video", "."), ("--video", "is a directory", ".mp4")),
    (("drive", "--video", "clip.avi"), ("--video", ".mp4")),
    (("drive", "--resolution", "100000x100000"), ("--resolution", "1024")),
    (("offline", "--policy", "zeros", "--data", "d", "--out", "."), ("--out", "is a directory")),
    (("study", "--config", "demo", "--out", "o", "--workers", "0"), ("--workers", ">= 1")),
]


@pytest.mark.parametrize("args, words", FLAG_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAG_CASES])
def test_bad_flags_are_refused_before_any_work(work, args, words):
    before = _entries(work)
    _assert_user_error(_run(*args, cwd=work, timeout=30), *words)
    assert _entries(work) == before  # nothing written


def test_unknown_keys_in_a_track_spec_are_named_with_a_suggestion(work):
    spec = json.loads(json.dumps(SHORT_SPEC))
    spec["segments"][0]["lenght"] = spec["segments"][0].pop("length")
    (work / "typo.json").write_text(json.dumps(spec))
    _assert_user_error(_run("drive", "--track", "typo.json", "--resolution", "16x32", cwd=work),
                       "'lenght'", "did you mean 'length'", "segments[0]", "typo.json")
    spec = {**SHORT_SPEC, "lane_widht": 3.5}
    (work / "typo.json").write_text(json.dumps(spec))
    _assert_user_error(_run("drive", "--track", "typo.json", "--resolution", "16x32", cwd=work),
                       "'lane_widht'", "did you mean 'lane_width'")


def test_unknown_keys_in_a_suite_are_named_with_a_suggestion(work):
    (work / "suite.json").write_text(json.dumps({"name": "s", "tracks": ["short.json"], "sped": 8}))
    _assert_user_error(_run("evaluate", "--policy", "expert", "--suite", "suite.json", "--out", "o", cwd=work),
                       "'sped'", "did you mean 'speed'", "suite.json")
    assert not (work / "o").exists()


def test_deeply_nested_json_is_refused_naming_the_file(work):
    (work / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    _assert_user_error(_run("drive", "--track", "deep.json", cwd=work), "deep.json", "nested")
    _assert_user_error(_run("evaluate", "--policy", "expert", "--suite", "deep.json", "--out", "o", cwd=work),
                       "deep.json", "nested")
    assert not (work / "o").exists()


def _damaged_checkpoint(root: Path, edit) -> Path:
    path = root / "ckpt"
    shutil.copytree(REFERENCE_CHECKPOINT, path)
    edit(path)
    return path


def test_nan_weights_are_refused_naming_the_tensor(work):
    def poison(path: Path) -> None:
        tensors = load_file(str(path / "model.safetensors"))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = np.nan
        save_file(tensors, str(path / "model.safetensors"))

    ckpt = _damaged_checkpoint(work, poison)
    _assert_user_error(_run("offline", "--policy", str(ckpt), "--data", "d", cwd=work), "NaN", "model.safetensors")
    _assert_user_error(_run("evaluate", "--policy", str(ckpt), "--suite", "smoke", "--out", "o", cwd=work), "NaN")
    assert not (work / "o").exists()


def test_a_model_config_missing_fields_is_refused_naming_them(work):
    def truncate(path: Path) -> None:
        meta = json.loads((path / "config.json").read_text())
        del meta["model"]["hidden"]
        (path / "config.json").write_text(json.dumps(meta))

    ckpt = _damaged_checkpoint(work, truncate)
    _assert_user_error(_run("offline", "--policy", str(ckpt), "--data", "d", cwd=work), "['hidden']", "config.json")


def test_unknown_model_config_key_gets_a_suggestion(work):
    def typo(path: Path) -> None:
        meta = json.loads((path / "config.json").read_text())
        meta["model"]["hiden"] = meta["model"]["hidden"]
        (path / "config.json").write_text(json.dumps(meta))

    ckpt = _damaged_checkpoint(work, typo)
    _assert_user_error(_run("offline", "--policy", str(ckpt), "--data", "d", cwd=work), "'hiden'",
                       "did you mean 'hidden'")


def test_offline_on_a_dataset_without_episodes_is_refused(work):
    from steerloop.driving_log import DrivingLogWriter

    writer = DrivingLogWriter(work / "empty", config={"control_hz": 20}, cameras=("center",), resolution=(16, 32),
                              suite="train", seeds={"seed": 0})
    del writer  # the manifest is written when the writer is created
    _assert_user_error(_run("offline", "--policy", "zeros", "--data", "empty", "--out", "m.json", cwd=work),
                       "no episodes", "steerloop record")
    assert not (work / "m.json").exists()


def test_unwritable_output_is_one_line(work):
    # /proc refuses new entries even for root: a stand-in for a read-only file system.
    _assert_user_error(_run("evaluate", "--policy", "expert", "--suite", "smoke", "--out", "/proc/steerloop-out",
                            cwd=work), "/proc/steerloop-out")


def test_a_full_disk_is_one_line(monkeypatch, capsys):
    import errno

    from steerloop.evaluation import cli, runner

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/results.json")

    monkeypatch.setattr(runner, "evaluate", full)
    assert cli.main(["evaluate", "--policy", "expert", "--suite", "smoke", "--out", "/data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/data/results.json" in err[0] and "No space left" in err[0], err


def test_drive_json_is_strict_json_even_with_nan_metrics(monkeypatch, capsys, work):
    from steerloop.evaluation import cli, rollout

    real = rollout.rollout

    def with_nan(*args, **kwargs):
        episode = real(*args, **kwargs)
        episode.metrics["on_policy_rmse"] = float("nan")
        return episode

    monkeypatch.setattr(rollout, "rollout", with_nan)
    assert cli.main(["drive", "--track", str(work / "short.json"), "--resolution", "16x32", "--json"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert summary["on_policy_rmse"] is None
