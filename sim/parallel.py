"""Process-parallel map used by recording and evaluation: one simulator per process."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Callable, Iterable

# Each distinct track costs a worker PyBullet mesh memory it never frees; recycling workers
# after this many tasks bounds a long run's memory.
TASKS_PER_WORKER = 50


def run_in_processes(fn: Callable, jobs: Iterable[tuple], on_result: Callable, *, workers: int,
                     initializer: Callable | None = None, initargs: tuple = ()) -> None:
    """Call ``fn(*job)`` for every job in ``workers`` processes (forkserver) and hand each
    result to ``on_result`` in the parent as soon as it is ready. On an exception or
    Ctrl-C, pending jobs are cancelled; results already handed over are kept."""
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver"), initializer=initializer,
                             initargs=initargs, max_tasks_per_child=TASKS_PER_WORKER) as pool:
        pending = {pool.submit(fn, *job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_result(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
