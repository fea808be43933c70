"""Parallel map used by recording and evaluation: one simulator per worker.

Two backends run the same tasks and give the same results:

- ``local``: worker processes on this machine (forkserver), or this process for a
  single worker;
- ``ray``: Ray tasks on a local Ray instance or an existing Ray cluster (the optional
  ``steerloop[ray]`` extra). Each task asks Ray for one CPU; the task's torch (and
  OpenCV) threads are set from the CPUs Ray assigned to it.

Tasks return their results to the calling process, which alone writes files, so the
outputs never depend on the backend or on the number of workers.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import active_children, connection, get_context, parent_process
from multiprocessing.process import BaseProcess
from typing import Callable, Iterable

from steerloop.errors import SteerloopError

BACKENDS = ("local", "ray")
RAY_INSTALL_HINT = 'pip install "steerloop[ray]"'

# Each distinct track costs a worker PyBullet mesh memory it never frees; recycling workers
# after this many tasks bounds a long run's memory (a Ray worker process exits after as many).
TASKS_PER_WORKER = 50
CONNECT_TIMEOUT_S = 5.0  # a HOST:PORT that does not accept a TCP connection within this is refused
WORKER_STOP_TIMEOUT_S = 5.0  # [s] an interrupted run waits this long for a terminated worker, then kills it
PARENT_GONE_EXIT = 1  # exit status of a worker whose parent process died


class BackendError(SteerloopError):
    """A backend cannot be used: unknown name, Ray not installed, or no cluster at the address."""


def check_backend(backend: str, address: str | None = None) -> None:
    """Fail early, before any work, when ``backend``/``address`` cannot be used."""
    if backend not in BACKENDS:
        raise BackendError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if address is not None and backend != "ray":
        raise BackendError(f"--address {address!r} is only used with --backend ray (got --backend {backend})")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise BackendError(f"--backend ray needs Ray, which is not installed; install it with: {RAY_INSTALL_HINT}")


def _exit_with_parent() -> None:
    """In a worker process: exit as soon as the process that started it is gone.

    The worker's parent in multiprocessing's sense is the steerloop process (the forkserver
    only forks it), and ``parent_process().sentinel`` is a pipe that process alone holds
    open: it reads as closed the moment that process dies, however it dies (SIGKILL
    included). Without this, workers of a killed run wait for work forever, and the
    forkserver and the resource tracker, which live while any worker does, with them.
    """
    parent = parent_process()
    if parent is None:
        return

    def watch() -> None:
        connection.wait([parent.sentinel])
        os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="steerloop-parent-watchdog", daemon=True).start()


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    _exit_with_parent()
    if initializer is not None:
        initializer(*initargs)


def _stop_workers(workers: Iterable[BaseProcess]) -> None:
    """Terminate worker processes (their running tasks are abandoned) and reap them."""
    workers = [worker for worker in workers if worker.is_alive()]
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(WORKER_STOP_TIMEOUT_S)
        if worker.is_alive():
            worker.kill()
            worker.join()


def run_in_processes(fn: Callable, jobs: Iterable[tuple], on_result: Callable, *, workers: int,
                     initializer: Callable | None = None, initargs: tuple = ()) -> None:
    """Call ``fn(*job)`` for every job in ``workers`` processes (forkserver) and hand each
    result to ``on_result`` in the parent as soon as it is ready. On an exception or
    Ctrl-C (or SIGTERM, which the CLI turns into one), pending jobs are cancelled; results
    already handed over are kept. On Ctrl-C the workers are stopped at once, so running
    tasks are abandoned rather than waited for. Workers exit by themselves if this process
    dies without cleaning up (SIGKILL)."""
    before = set(active_children())
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver"), initializer=_start_worker,
                             initargs=(initializer, initargs), max_tasks_per_child=TASKS_PER_WORKER) as pool:
        pending = {pool.submit(fn, *job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_result(future.result())
        except KeyboardInterrupt:
            # No future is cancelled here: the pool, finding its workers gone, fails every
            # pending future itself (it cannot fail a cancelled one and would raise).
            _stop_workers(set(active_children()) - before)
            raise
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def run_tasks(fn: Callable, jobs: Iterable[tuple], on_result: Callable, *, workers: int, backend: str = "local",
              address: str | None = None, initializer: Callable | None = None, initargs: tuple = ()) -> None:
    """Call ``fn(*job)`` for every job and hand each result to ``on_result`` in this
    process as soon as it is ready (in completion order; callers key results by job).

    ``workers`` is the number of tasks running at once. With ``backend="local"`` a single
    worker (or a single job) runs in this process, more run in worker processes. With
    ``backend="ray"`` every job is a Ray task: on the Ray instance this process is already
    connected to, else on the cluster at ``address`` ("auto" or "HOST:PORT"), else on a new
    local instance with ``workers`` CPUs. ``initializer(*initargs)`` runs once per worker
    process and run, before its first task. On an exception or Ctrl-C, pending tasks are
    cancelled; results already handed over are kept.
    """
    check_backend(backend, address)
    jobs = list(jobs)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if backend == "ray":
        _run_on_ray(fn, jobs, on_result, workers=workers, address=address, initializer=initializer,
                    initargs=initargs)
    elif workers == 1 or len(jobs) <= 1:
        if initializer is not None:
            initializer(*initargs)
        for job in jobs:
            on_result(fn(*job))
    else:
        run_in_processes(fn, jobs, on_result, workers=workers, initializer=initializer, initargs=initargs)


# ----------------------------------------------------------------------------- Ray
_RAY_RUN: dict = {}  # in a Ray worker process: the run whose initializer has run here


def set_threads_from_allotment() -> int:
    """In a Ray task: torch and OpenCV threads = the CPUs Ray assigned to the task (at least 1)."""
    import cv2
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def _ray_task(fn: Callable, initializer: Callable | None, initargs: tuple, run: str, job: tuple):
    if _RAY_RUN.get("run") != run:
        if initializer is not None:
            initializer(*initargs)
        _RAY_RUN["run"] = run
    set_threads_from_allotment()
    return fn(*job)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect this process to Ray unless it already is: to the cluster at ``address``
    ("auto" or "HOST:PORT"), or start a local instance with ``num_cpus`` CPUs."""
    check_backend("ray", address)
    import ray

    if ray.is_initialized():
        return
    if address is not None and not _accepts_connections(address):
        raise BackendError(f"--address {address}: nothing accepts connections there (tried for "
                           f"{CONNECT_TIMEOUT_S:g} s); start the cluster with `ray start --head` on the head node "
                           "and pass its HOST:PORT (6379 by default), or --address auto on a cluster node")
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
        else:
            ray.init(address=address)
    except ConnectionError as error:
        raise BackendError(f"--address {address}: no Ray cluster could be reached ({error}); start one with "
                           "`ray start --head` on the head node, or drop --address to start a local "
                           "instance") from None


def _accepts_connections(address: str) -> bool:
    """Whether a plain HOST:PORT address accepts a TCP connection ("auto" and ray:// URLs are left to Ray)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return True
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _ray_result(ray, ref):
    """``ray.get(ref)``; a task's user error (a ValueError, whose message is the whole story)
    is raised as itself, not wrapped in Ray's multi-line remote traceback, as a local worker's is."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ValueError):
            raise error.cause from None
        raise


def _run_on_ray(fn: Callable, jobs: list[tuple], on_result: Callable, *, workers: int, address: str | None,
                initializer: Callable | None, initargs: tuple) -> None:
    if not jobs:
        return
    import ray

    connect_ray(address, num_cpus=workers)
    task = ray.remote(num_cpus=1, max_calls=TASKS_PER_WORKER, max_retries=0)(_ray_task)
    run = uuid.uuid4().hex
    queue = list(reversed(jobs))
    pending: list = []
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                pending.append(task.remote(fn, initializer, initargs, run, queue.pop()))
            finished, pending = ray.wait(pending, num_returns=1)
            for ref in finished:
                on_result(_ray_result(ray, ref))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise

