"""The task backends of steerloop.parallel: local processes and Ray tasks, and their refusals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from steerloop.evaluation.cli import main
from steerloop.parallel import BackendError, RAY_INSTALL_HINT, check_backend, run_tasks, set_threads_from_allotment
from helpers import alive


def test_local_backend_runs_every_job_in_process_or_in_workers():
    for workers in (1, 2):
        results = []
        run_tasks(divmod, [(7, 2), (9, 4), (5, 5)], results.append, workers=workers)
        assert sorted(results) == [(1, 0), (2, 1), (3, 1)]


def test_ray_tasks_return_every_result_with_threads_from_the_cpu_allotment(ray_local):
    results = []
    run_tasks(divmod, [(7, 2), (9, 4), (5, 5)], results.append, workers=2, backend="ray")
    assert sorted(results) == [(1, 0), (2, 1), (3, 1)]
    threads = []
    run_tasks(set_threads_from_allotment, [(), ()], threads.append, workers=2, backend="ray")
    assert threads == [1, 1]  # each task asks Ray for one CPU


def test_a_failing_ray_task_raises_its_error_in_the_caller(ray_local):
    with pytest.raises(ZeroDivisionError):
        run_tasks(divmod, [(1, 0)], lambda result: None, workers=1, backend="ray")


def test_unknown_backend_and_stray_address_are_refused():
    with pytest.raises(BackendError, match="--backend must be one of"):
        check_backend("dask")
    with pytest.raises(BackendError, match="only used with --backend ray"):
        check_backend("local", "auto")
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        run_tasks(divmod, [(1, 1)], print, workers=0)


def test_without_ray_the_flag_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # importlib.util.find_spec("ray") is now None
    with pytest.raises(BackendError, match="steerloop\\[ray\\]"):
        check_backend("ray")
    for command in (["evaluate", "--policy", "expert", "--suite", "smoke", "--out", str(tmp_path / "eval")],
                    ["record", "--out", str(tmp_path / "data"), "--episodes", "1"]):
        assert main([*command, "--backend", "ray", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert RAY_INSTALL_HINT in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "data").exists()  # refused before any work


def test_an_unreachable_cluster_address_is_refused_before_any_work(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "steerloop", "evaluate", "--policy", "expert", "--suite",
                             "smoke", "--out", str(out), "--backend", "ray", "--address", "127.0.0.1:1", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "127.0.0.1:1" in result.stderr and "ray start --head" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- process lifetime
ORPHAN_SCRIPT = """
import time
from steerloop.parallel import run_tasks
run_tasks(time.sleep, [(60,)] * 4, print, workers=2)
"""
GONE_WITHIN_S = 5.0  # [s] every descendant of a killed run must be gone by then


def _descendants_once_running(proc, count: int, timeout: float = 60.0) -> list:
    """The process tree under ``proc`` once it has ``count`` descendants (forkserver, workers, resource tracker)."""
    psutil = pytest.importorskip("psutil")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        if len(descendants) >= count:
            return descendants
        assert proc.poll() is None, f"the run ended early with exit code {proc.returncode}"
        time.sleep(0.1)
    raise AssertionError(f"no {count} descendants after {timeout:g} s")


def _assert_all_gone(descendants: list) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while alive(descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(descendants)
    for process in left:  # do not leave them behind on failure either
        process.kill()
    assert not left, f"still running {GONE_WITHIN_S:g} s after the parent died: " + \
        "; ".join(" ".join(p.cmdline())[-70:] for p in left)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_forkserver_and_resource_tracker_die_with_their_parent(sig):
    """A run killed without any clean-up (SIGKILL, or SIGTERM with no handler) leaves no
    process behind: the workers notice their parent is gone, and the forkserver and the
    resource tracker, which live while any worker does, follow (before: all ran forever)."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT])
    try:
        descendants = _descendants_once_running(proc, 4)  # resource tracker, forkserver, 2 workers
        time.sleep(1.0)  # the workers are inside their 60 s tasks
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == -sig
        _assert_all_gone(descendants)
    finally:
        proc.kill()
        proc.wait()
