"""Interrupting commands: SIGTERM stops like Ctrl-C (clean-up, completed work kept, resumable)
with exit code 143 (Ctrl-C: 130), and no worker process outlives the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from steerloop.evaluation import cli
from helpers import alive

psutil = pytest.importorskip("psutil")

SCENARIOS = 8  # 50 m routes at 10 m/s, ~0.5 s of CPU each at 16x32: SIGTERM lands mid-run
STOP_WITHIN_S = 20.0  # [s] from SIGTERM to exit (the workers are stopped, not waited for)
GONE_WITHIN_S = 5.0  # [s] after exit, every descendant of the run must be gone


def _sigterm_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5.0)  # the handler interrupts this sleep
    raise AssertionError("SIGTERM did not interrupt the command")


def _ignore(signum, frame) -> None:
    """Outside ``main()`` a SIGTERM must not end the test process."""


@pytest.fixture
def sigterm_ignored():
    previous = signal.signal(signal.SIGTERM, _ignore)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_in_a_command_without_its_own_handler_exits_143(monkeypatch, capsys, sigterm_ignored):
    monkeypatch.setattr("steerloop.driving_log.validate", _sigterm_self)
    assert cli.main(["validate", "somewhere"]) == cli.EXIT_TERMINATED == 143
    assert "steerloop validate: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is _ignore  # main() leaves the process's handler as it was


def test_sigterm_takes_the_commands_own_ctrl_c_path(monkeypatch, tmp_path, capsys, sigterm_ignored):
    monkeypatch.setattr("steerloop.training.record.record", _sigterm_self)
    assert cli.main(["record", "--out", str(tmp_path / "data"), "--episodes", "1", "--quiet"]) == 143
    err = capsys.readouterr().err
    assert "completed episodes are kept" in err and "re-run the same command" in err


def _suite(tmp_path) -> str:
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"name": "sigterm", "tracks": [200_000 + i for i in range(SCENARIOS)],
                                "track_length": 50.0}))
    return str(path)




def test_sigterm_stops_a_parallel_evaluation_cleanly_and_the_rerun_resumes(tmp_path):
    """``evaluate --workers 2``: SIGTERM once a scenario has finished exits 143 promptly,
    keeps every finished scenario, leaves no process behind; the same command finishes the rest."""
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "steerloop", "evaluate", "--policy", "expert", "--suite", _suite(tmp_path),
               "--out", str(out), "--workers", "2", "--batch", "1", "--resolution", "16x32", "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    descendants = []
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("scenarios/*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_WITHIN_S)
        deadline = time.monotonic() + GONE_WITHIN_S
        while alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(descendants)
    finally:
        for process in [proc, *alive(descendants)]:  # leave nothing behind, even on failure
            process.kill()
        proc.wait()
    assert proc.returncode == 143, err
    assert "interrupted; finished scenarios are kept" in err and "Traceback" not in err
    assert not left, [" ".join(p.cmdline())[-60:] for p in left]

    kept = {path.name: path.read_bytes() for path in out.glob("scenarios/*.json")}
    assert 1 <= len(kept) < SCENARIOS and not (out / "results.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results["scenarios"]) == SCENARIOS
    for name, data in kept.items():  # finished scenarios were kept, not run again
        assert (out / "scenarios" / name).read_bytes() == data
