"""One sandboxed call as a process: spawn the launcher (`tools/_launcher.py`), feed the program's stdin, read its
stdout up to a cap and the tail of its stderr, end the call at its timeout or on cancel, and clean up (the
launcher's exit awaited, the pipes closed) even when cancelled again meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tools import _children

log = logging.getLogger(__name__)

LAUNCHER_GRACE_S = 2.0  # for the launcher to end its call after SIGTERM, before its group gets SIGKILL


class Limits(Protocol):
    timeout_s: float
    max_output_bytes: int
    max_stderr_bytes: int


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: bytes
    stderr: bytes
    overflow: bool


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def despite_cancel(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run `cleanup` to its end even when the calling task is cancelled meanwhile, then re-raise that cancel.

    Cleanup after a first cancel must survive a second one: a tool timeout followed within milliseconds by the run
    being stopped, whose stream merge cancels the call again. Cut short, it would leave the launcher running and
    the pipes' descriptors open. `asyncio.wait` returns when the caller is cancelled without cancelling the
    cleanup task, which is always awaited to its end here.
    """
    task = asyncio.create_task(cleanup)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is None:
        task.result()
        return
    if not task.cancelled() and task.exception() is not None:  # the caller sees its cancel; the failure goes to logs
        log.error("sandbox cleanup failed after a cancel", exc_info=task.exception())
    raise cancelled


class _Overflow(Exception):
    pass


async def _read_capped(stream: asyncio.StreamReader, cap: int, on_overflow: Callable[[], None]) -> bytes:
    data = bytearray()
    while chunk := await stream.read(65536):
        data += chunk
        if len(data) > cap:
            on_overflow()
            raise _Overflow
    return bytes(data)


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-keep:] if keep else b""
    return tail


async def _feed(stream: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the program need not read its input
        stream.write(data)
        await stream.drain()
        stream.close()
        await stream.wait_closed()


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the launcher has exited, its call's processes all gone. `Process.wait()` on Python 3.11 also
    waits until every holder of the pipes has closed them."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


async def run_launcher(argv: Sequence[str], cwd: Path, env: dict[str, str], data: bytes, limits: Limits) -> Finished:
    """Run the launcher's `argv` with `data` on stdin until it exits; raises TimeoutError after `limits.timeout_s`.
    Whatever happens, the launcher has exited (its call's processes all gone) when this returns or raises."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(limit=65536, loop=loop),
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own session and process group: pgid == pid
        close_fds=True,
    )
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    launcher = proc.pid
    _children.track(launcher)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    overflow = False

    def end_call() -> None:  # the launcher kills and reaps every process of the call, then exits
        if not protocol.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(launcher, signal.SIGTERM)

    def kill_on_overflow() -> None:
        nonlocal overflow
        overflow = True
        end_call()

    tasks = [
        asyncio.create_task(_read_capped(proc.stdout, limits.max_output_bytes, kill_on_overflow)),
        asyncio.create_task(_read_tail(proc.stderr, limits.max_stderr_bytes)),
        asyncio.create_task(_feed(proc.stdin, data)),
    ]
    try:
        async with asyncio.timeout(limits.timeout_s):
            await protocol.exited.wait()  # the launcher exits after the program, its processes all gone
            stdout, stderr, _ = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        end_call()
        for task in tasks:
            task.cancel()

        async def clean_up() -> None:
            try:
                async with asyncio.timeout(LAUNCHER_GRACE_S):
                    await protocol.exited.wait()
            except TimeoutError:
                # The launcher did not end the call: stuck, or stopped by a program of its own user. The group (the
                # launcher and what did not leave it) gets SIGKILL while the launcher, unreaped, still holds its id.
                log.warning("sandbox launcher did not exit; killing its process group", extra={"pid": launcher})
                kill_group(launcher)
                await protocol.exited.wait()
            _children.untrack(launcher)
            await asyncio.gather(*tasks, return_exceptions=True)
            # Our ends of the pipes are closed here. asyncio closes them by itself only once each has reported end
            # of file: some loop turns later, or never when output was left unread (past the output cap the reader
            # stops; what the program wrote meanwhile fills the stream's buffer and pauses the pipe).
            transport.close()
            await asyncio.sleep(0)  # the pipes close their descriptors in callbacks close() queued: let them run

        await despite_cancel(clean_up())
    assert proc.returncode is not None  # set when the launcher exited (`protocol.exited`)
    return Finished(
        returncode=proc.returncode,
        stdout=stdout if isinstance(stdout, bytes) else b"",
        stderr=stderr if isinstance(stderr, bytes) else b"",
        overflow=overflow or isinstance(stdout, _Overflow),
    )
