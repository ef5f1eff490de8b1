"""Where a batch's tasks run: in this process, in a local process pool, or on a Dask cluster.

All three take ``submit(fn, task, gpu=False)`` and yield ``(task, result)`` pairs from
``results()`` as tasks finish, in any order.  ``result`` is what ``fn(task)`` returned, or a
:class:`WorkerFailure` when the task could not run to its end (its worker process died more
than ``retries`` times, or the cluster gave up on it).  ``fn`` is expected to catch its own
errors (a bad scan is a result, not an exception).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from cartiq.errors import InputError, one_line

__all__ = ["Serial", "LocalPool", "DaskCluster", "WorkerFailure", "worker_index"]

log = logging.getLogger(__name__)

_WORKER_INDEX: int | None = None  # this process's number in a local pool (GPU assignment)


@dataclass(frozen=True)
class WorkerFailure:
    """A task that did not finish because of its worker, not because of its input."""

    error: str


def worker_index() -> int | None:
    """Number of this process in a local pool (0, 1, ...); None outside a pool."""
    return _WORKER_INDEX


class Serial:
    """One local worker: tasks run in this process, in submit order (no pool overhead)."""

    def __init__(self) -> None:
        self._queue: deque[tuple[Callable, Any]] = deque()

    def submit(self, fn: Callable, task: Any, gpu: bool = False) -> None:
        self._queue.append((fn, task))

    def results(self) -> Iterator[tuple[Any, Any]]:
        while self._queue:
            fn, task = self._queue.popleft()
            yield task, fn(task)

    def close(self, abort: bool = False) -> None:
        self._queue.clear()


def _init_worker(counter: Any, threads: int, main_pid: int | None = None) -> None:
    """Pool worker start-up: it dies with the batch process, takes its number (GPU
    assignment) and its share of the CPU threads."""
    global _WORKER_INDEX
    import SimpleITK as sitk

    if main_pid is not None:
        _die_with(main_pid)

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    limit_threads(threads)
    with counter.get_lock():
        _WORKER_INDEX, counter.value = counter.value, counter.value + 1


def limit_threads(threads: int) -> None:
    """This process's CPU threads: BLAS/OpenMP pools already loaded (numpy, scipy, torch's
    OpenMP) through threadpoolctl, torch's intra-op pool when torch is loaded, and a hook
    that limits torch's pool when a later stage imports it (segmentation)."""
    import sys

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        _TORCH_THREADS[0] = threads


_TORCH_THREADS: list[int | None] = [None]


def torch_threads() -> int | None:
    """The thread share this worker was given (for torch, imported after start-up)."""
    return _TORCH_THREADS[0]


def _die_with(main_pid: int) -> None:
    """End this worker when the batch process ends, however it ends (SIGKILL included).

    Linux: the kernel sends SIGKILL when the parent (the fork server, which exits when the
    batch process is gone) dies.  Everywhere: a watchdog thread exits the process once
    ``main_pid`` is gone or this process has been re-parented.
    """
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent = os.getppid()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a killed process that its own parent has not reaped yet
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return True

    def watch() -> None:
        while os.getppid() == parent and alive(main_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="cartiq-watchdog", daemon=True).start()


class LocalPool:
    """Local workers forked from a server that has the stages imported (fast start), one task
    in flight per worker; when a worker dies (killed, out of memory) the pool is replaced and
    the tasks in flight rerun one at a time, at most ``retries`` times, then count as failed.

    ``preload``: modules the workers need, imported once by the server they fork from.
    """

    def __init__(self, workers: int, retries: int, preload: tuple[str, ...] = ()) -> None:
        import multiprocessing as mp

        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            from multiprocessing import forkserver

            self._ctx.set_forkserver_preload(list(preload))
            # start the server now: it imports the stages while this process goes on with its
            # own start-up; workers fork from it on the first submit
            forkserver.ensure_running()
        self._workers, self._retries, self._counter = workers, retries, self._ctx.Value("i", 0)
        self._backlog: deque[tuple[Callable, Any, int]] = deque()
        self._running: dict[Any, tuple[Callable, Any, int, Any]] = {}
        self._pool = self._new_pool()

    def _new_pool(self) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // self._workers)
        return ProcessPoolExecutor(self._workers, mp_context=self._ctx, initializer=_init_worker,
                                   initargs=(self._counter, threads, os.getpid()))

    def submit(self, fn: Callable, task: Any, gpu: bool = False) -> None:
        self._backlog.append((fn, task, 0))
        self._fill()

    def _fill(self) -> None:
        while self._backlog and len(self._running) < self._workers:
            if self._running and any(t[2] for t in (*self._running.values(), self._backlog[0])):
                break  # a rerun after a crash runs alone: it cannot take other scans down
            fn, task, tries = self._backlog.popleft()
            self._running[self._pool.submit(fn, task)] = (fn, task, tries, self._pool)

    def results(self) -> Iterator[tuple[Any, Any]]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while self._running:
            for fut in wait(list(self._running), return_when=FIRST_COMPLETED)[0]:
                fn, task, tries, pool = self._running.pop(fut)
                try:
                    yield task, fut.result()
                except BrokenProcessPool:
                    if pool is self._pool:  # first news of this breakage: a fresh pool
                        log.warning("a worker process died; restarting the pool")
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._pool = self._new_pool()
                    if tries < self._retries:
                        self._backlog.appendleft((fn, task, tries + 1))
                    else:
                        yield task, WorkerFailure(f"worker process died {tries + 1} times "
                                                  "(out of memory?)")
                except Exception as exc:
                    yield task, WorkerFailure(one_line(exc))
            self._fill()

    def close(self, abort: bool = False) -> None:
        """Wait for the workers to finish; ``abort``: end them now (SIGTERM, an error)."""
        if abort:
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                try:
                    proc.terminate()
                except (OSError, ValueError):  # already gone
                    pass
        self._pool.shutdown(wait=not abort, cancel_futures=True)


class DaskCluster:
    """An existing Dask cluster: tasks go to its scheduler; Dask reruns those of lost workers."""

    def __init__(self, scheduler: str, retries: int) -> None:
        from distributed import Client, as_completed

        try:
            self._client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise InputError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
        info = self._client.scheduler_info().get("workers", {})
        self._gpu_resource = any("GPU" in (w.get("resources") or {}) for w in info.values())
        log.info("dask: %d worker(s) at %s", len(info), scheduler)
        self._retries, self._ac, self._tasks, self._futures = retries, as_completed(), {}, {}

    def submit(self, fn: Callable, task: Any, gpu: bool = False) -> None:
        """``gpu``: the task needs a GPU; on workers started with ``--resources GPU=1`` it
        takes one (one model per GPU at a time)."""
        fut = self._client.submit(fn, task, pure=False, retries=self._retries,
                                  resources={"GPU": 1} if gpu and self._gpu_resource else None)
        self._tasks[fut.key], self._futures[fut.key] = task, fut
        self._ac.add(fut)

    def results(self) -> Iterator[tuple[Any, Any]]:
        for fut in self._ac:
            task = self._tasks.pop(fut.key)
            self._futures.pop(fut.key, None)
            try:
                outcome = fut.result()
            except Exception as exc:  # KilledWorker, lost connection...
                outcome = WorkerFailure(one_line(exc))
            fut.release()
            yield task, outcome

    def close(self, abort: bool = False) -> None:
        if abort:  # this batch's tasks only; the cluster is not ours to stop
            self._client.cancel(list(self._futures.values()), force=True)
        self._client.close()
