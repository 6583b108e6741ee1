"""``listen --exec``: run a command for each message, at least once, on this machine.

Each message is handed to the hook as its ``listen`` JSON line on stdin and as
environment variables (``CHATCLI_ID``, ``CHATCLI_FROM``, ``CHATCLI_TO``,
``CHATCLI_TEXT``, ``CHATCLI_TS``, ``CHATCLI_REPLY_TO`` for a reply, and
``CHATCLI_ATTEMPT``). A message counts as handled only once its hook exited 0,
or once it was written to the dead-letter file after ``max_attempts`` failures;
``HookRunner`` reports the highest id below which every message is handled
(``on_handled``), and only that moves the cursor (file and server). So a
``listen`` killed at any moment, ``kill -9`` included, and started again with the
same cursor file runs each message's hook again or for the first time: at least
once, never skipped.

Order: one message at a time by default. With ``parallel`` N, up to N hooks run
at once, but a sender's messages still run one after the other, in order.

The hook's stdout and stderr go to listen's stderr, so listen's stdout stays
machine-readable: one JSON line per message whose hook succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from chatcli.client.reconnect import Backoff
from chatcli.client.render import message_json
from chatcli.errors import ClientError, UsageError
from chatcli.protocol import Message

__all__ = ["HookOptions", "HookRunner", "hook_environment"]

#: The longest CHATCLI_TEXT: the kernel refuses a larger single environment string (E2BIG at 128 KiB);
#: stdin always carries the whole text.
ENV_TEXT_MAX: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class HookOptions:
    #: The command as argv (``--exec CMD`` is ``sh -c CMD``).
    argv: tuple[str, ...]
    parallel: int = 1
    #: Attempts before a message goes to ``dead_letter``; None retries until the hook succeeds.
    max_attempts: int | None = None
    dead_letter: Path | None = None
    #: Seconds before a hook still running is killed (its process group); None: never.
    timeout: float | None = 60.0
    #: Backoff between attempts: first delay and cap, in seconds.
    retry_first: float = 0.5
    retry_cap: float = 30.0

    @classmethod
    def build(cls, shell_command: str | None, argv: list[str] | None, **options: object) -> HookOptions:
        """Check what ``listen`` was given: exactly one of ``--exec CMD`` and ``-- ARGV``."""
        if (shell_command is None) == (not argv):
            raise UsageError("give the hook once: --exec CMD (run by the shell) or -- PROGRAM ARGS…")
        command = ("/bin/sh", "-c", shell_command) if shell_command is not None else tuple(argv or ())
        if shutil.which(command[0]) is None:
            raise UsageError(f"cannot run the hook: {command[0]!r} is not an executable program")
        hooks = cls(command, **options)  # type: ignore[arg-type]
        if (hooks.max_attempts is None) != (hooks.dead_letter is None):
            raise UsageError("--max-attempts and --dead-letter go together: a message given up on must be "
                             "written somewhere")
        if hooks.dead_letter is not None:
            try:
                with hooks.dead_letter.open("a", encoding="utf-8"):
                    pass
            except OSError as exc:
                raise UsageError(f"cannot write the dead-letter file {str(hooks.dead_letter)!r}: "
                                 f"{exc.strerror or exc}") from None
        return hooks


def hook_environment(message: Message, attempt: int) -> dict[str, str]:
    """The hook's environment: ours, and the message's fields (NUL cannot be in one: dropped there)."""
    env = dict(os.environ)
    env.update(CHATCLI_ID=str(message.id), CHATCLI_FROM=message.sender, CHATCLI_TO=message.to,
               CHATCLI_TEXT=message.text[:ENV_TEXT_MAX].replace("\0", ""), CHATCLI_TS=message.ts,
               CHATCLI_ATTEMPT=str(attempt))
    if message.reply_to is not None:
        env["CHATCLI_REPLY_TO"] = str(message.reply_to)
    else:
        env.pop("CHATCLI_REPLY_TO", None)
    return env


class HookRunner:
    """Runs the hook for each submitted message, retrying, and says how far everything is handled."""

    def __init__(self, options: HookOptions, *, on_success: Callable[[Message], None],
                 notice: Callable[[str], None], on_handled: Callable[[int], None] = lambda msg_id: None) -> None:
        self.options = options
        self.on_success = on_success
        self.on_handled = on_handled
        self.notice = notice
        self._slots = asyncio.Semaphore(options.parallel)
        #: Submitted messages not yet reported handled, in id order: id -> finished.
        self._open: OrderedDict[int, bool] = OrderedDict()
        self._last_of_sender: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._processes: set[asyncio.subprocess.Process] = set()
        #: Failed attempts so far (each is reported on stderr), and messages given up on.
        self.failures = 0
        self.dead = 0
        #: What stopped the hooks for good (a dead-letter file that cannot be written): raised to listen.
        self._fatal: ClientError | None = None
        #: Bumped when the server's store changed: hooks of the old store's messages still finish, but their
        #: ids are no position in the new store, so they no longer move the cursor.
        self._store = 0

    @property
    def unfinished(self) -> int:
        """Messages submitted whose hook has not yet succeeded (running, waiting or retrying)."""
        return sum(1 for finished in self._open.values() if not finished)

    def store_changed(self) -> None:
        """The server came back with another store: forget the old store's ids (see ``_store``)."""
        self._store += 1
        self._open.clear()

    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def submit(self, message: Message) -> None:
        """Start handling ``message`` once a slot is free (at most ``parallel`` wait or run at once)."""
        self._check()
        await self._slots.acquire()
        self._check()
        previous = self._last_of_sender.get(message.sender)
        self._open[message.id] = False
        task = asyncio.create_task(self._handle(message, previous, self._store))
        self._last_of_sender[message.sender] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every submitted message is handled."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        self._check()

    def stop(self) -> None:
        """Kill running hooks and forget what is in flight: those messages are not handled, so the next run
        (from the cursor) runs them again."""
        for task in self._tasks:
            task.cancel()
        for process in self._processes:
            _kill_group(process)

    async def _handle(self, message: Message, previous: asyncio.Task[None] | None, store: int) -> None:
        try:
            if previous is not None:  # the same sender's earlier message first
                await asyncio.wait({previous})
            await self._until_handled(message)
        except ClientError as exc:
            self._fatal = self._fatal or exc
            return
        finally:
            self._slots.release()
            if self._last_of_sender.get(message.sender) is asyncio.current_task():
                del self._last_of_sender[message.sender]
        if store == self._store:
            try:
                self._finished(message.id)
            except ClientError as exc:  # the cursor file could not be written: stop, as listen does without hooks
                self._fatal = self._fatal or exc

    def _finished(self, msg_id: int) -> None:
        """Mark ``msg_id`` handled; report the highest id with every message up to it handled."""
        self._open[msg_id] = True
        handled = None
        while self._open and next(iter(self._open.items()))[1]:
            handled, _ = self._open.popitem(last=False)
        if handled is not None:
            self.on_handled(handled)

    async def _until_handled(self, message: Message) -> None:
        options = self.options
        backoff = Backoff(options.retry_first, options.retry_cap)
        attempt = 0
        while True:
            attempt += 1
            failure = await self._run(message, attempt)
            if failure is None:
                with contextlib.suppress(BrokenPipeError):  # nobody reads stdout (`| head -1`): hooks go on
                    self.on_success(message)
                return
            self.failures += 1
            if options.max_attempts is not None and attempt >= options.max_attempts:
                self._give_up(message, attempt, failure)
                return
            delay = backoff.next_delay()
            of = f" of {options.max_attempts}" if options.max_attempts is not None else ""
            self.notice(f"hook failed for message {message.id} from {message.sender} ({failure}), attempt "
                        f"{attempt}{of}; retrying in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _run(self, message: Message, attempt: int) -> str | None:
        """One attempt: None if the hook exited 0, else what went wrong."""
        try:
            process = await asyncio.create_subprocess_exec(
                *self.options.argv, stdin=asyncio.subprocess.PIPE, stdout=2, stderr=2,
                env=hook_environment(message, attempt), start_new_session=True)  # a group: killed whole
        except OSError as exc:
            return f"cannot run it: {exc.strerror or exc}"
        self._processes.add(process)
        try:
            async with asyncio.timeout(self.options.timeout):
                await process.communicate((message_json(message) + "\n").encode())
        except TimeoutError:
            _kill_group(process)
            await process.wait()
            return f"still running after {self.options.timeout:g} s: killed"
        finally:
            self._processes.discard(process)
        status = process.returncode
        if status == 0:
            return None
        return f"exit status {status}" if status is not None and status > 0 else f"killed by signal {-(status or 0)}"

    def _give_up(self, message: Message, attempts: int, failure: str) -> None:
        """Write the message to the dead-letter file, durably, before it counts as handled."""
        path = self.options.dead_letter
        assert path is not None  # max_attempts comes with a dead-letter file (HookOptions.build)
        record = json.loads(message_json(message)) | {"attempts": attempts, "error": failure}
        try:
            with path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:  # moving on would lose the message: stop instead
            raise ClientError(f"cannot write message {message.id} to the dead-letter file {str(path)!r}: "
                              f"{exc.strerror or exc}") from None
        self.dead += 1
        self.notice(f"hook failed for message {message.id} from {message.sender} ({failure}) {attempts} times: "
                    f"written to {path}, moving on")


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
