"""Storage off the event loop: one thread owns the SQLite connection, the loop hands it jobs.

A write can wait seconds for another process's lock (the sqlite3 shell, a backup,
``chatcli user add``), and a read of a large backlog takes milliseconds: neither
may run on the event loop. ``StorageThread`` runs jobs one at a time, in the
order they were submitted, and calls each job's ``done`` back on the loop, in
that same order. The relay relies on that order: a replay page read after a
commit sees the commit, and their results reach the loop in the same order.

``InlineStorage`` runs jobs at once on the caller's thread, for code without
an event loop (in-process tests, tools).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

from chatcli.errors import StorageError

__all__ = ["InlineStorage", "StorageRunner", "StorageThread", "run_job"]

log = logging.getLogger("chatcli.server")

T = TypeVar("T")


def run_job(job: Callable[[], T]) -> T | StorageError:
    """The job's result, or the StorageError it raised; a bug becomes a StorageError too (and is logged),
    so that only the sessions waiting on this job hear of it."""
    try:
        return job()
    except StorageError as exc:
        return exc
    except Exception as exc:
        log.exception("storage job failed", extra={"event": "storage-error"})
        return StorageError(f"internal error: {exc}")


class StorageRunner(Protocol):
    def submit(self, job: Callable[[], T], done: Callable[[T | StorageError], None]) -> None:
        """Run ``job`` after every job submitted before it; then ``done(result or StorageError)``."""
        ...

    async def call(self, job: Callable[[], T]) -> T | StorageError:
        """Run ``job`` after every job submitted before it and wait for its outcome."""
        ...


class InlineStorage:
    """Runs each job at once on the calling thread."""

    def submit(self, job: Callable[[], T], done: Callable[[T | StorageError], None]) -> None:
        done(run_job(job))

    async def call(self, job: Callable[[], T]) -> T | StorageError:
        return run_job(job)


class StorageThread:
    """One worker thread; results come back through ``loop.call_soon_threadsafe``, in submission order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatcli-storage")

    def submit(self, job: Callable[[], T], done: Callable[[T | StorageError], None]) -> None:
        def finished(future: Future[T | StorageError]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
                self._loop.call_soon_threadsafe(done, future.result())

        self._executor.submit(run_job, job).add_done_callback(finished)

    async def call(self, job: Callable[[], T]) -> T | StorageError:
        """Run ``job`` after every job submitted before it and wait for its outcome."""
        return await asyncio.wrap_future(self._executor.submit(run_job, job))

    def close(self) -> None:
        """Wait for the jobs already submitted, then stop the thread."""
        self._executor.shutdown(wait=True)
