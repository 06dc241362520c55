"""The Python API end to end: `rexec.connect` (async) and `rexec.Client` (sync) against a
real server, real processes, exact bytes and typed errors."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

import rexec
from rexec import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    ConnectionLost,
    ConnectTimeout,
    ExecError,
    RemoteError,
)

T = TypeVar("T")


def arun(fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run a coroutine with a hard bound so a bug fails instead of hanging the suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(fn(), timeout)

    return asyncio.run(bounded())


def test_public_api_is_sorted_and_lazy() -> None:
    assert rexec.__all__ == sorted(rexec.__all__)
    for name in rexec.__all__:
        assert getattr(rexec, name) is not None


def test_run_collects_output_and_status(server: Any) -> None:
    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            assert conn.info is not None and conn.info.protocol == "rexec/2"
            r = await conn.run("printf 'out'; printf 'err' >&2; exit 7")
            assert (r.stdout, r.stderr, r.exit_code, r.signal, r.ok) == (
                b"out",
                b"err",
                7,
                None,
                False,
            )
            r = await conn.run(["printf", "%s|", "a b", "it's", ""])
            assert r.stdout == b"a b|it's||" and r.ok
            r = await conn.run(["sh", "-c", "kill -TERM $$"])
            assert (r.exit_code, r.signal, r.shell_status) == (None, signal.SIGTERM, 143)
            with pytest.raises(CommandFailed, match="exit status 3"):
                await conn.run("exit 3", check=True)

    arun(go)


def test_binary_stdin_round_trip_is_exact(server: Any) -> None:
    data = os.urandom(8 * 1024 * 1024) + bytes(range(256))

    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            r = await conn.run(["cat"], stdin=data)
            assert len(r.stdout) == len(data)
            assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()

    arun(go)


def test_concurrent_commands_on_one_connection(server: Any) -> None:
    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            results = await asyncio.gather(
                *(conn.run(["sh", "-c", f"sleep 0.1; echo {i}"]) for i in range(100))
            )
            assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(100)]

    arun(go)


def test_streaming_process_with_stdin_and_signal(server: Any) -> None:
    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            proc = await conn.start(["cat"], stdin=True)
            await proc.write(b"line one\n")
            first = await proc.stdout.read_chunk()
            assert first == b"line one\n"
            await proc.write(b"two\n")
            await proc.close_stdin()
            assert await proc.stdout.read() == b"two\n"
            result = await proc.wait()
            assert result.exit_code == 0 and result.stdout == b""

            proc = await conn.start(["sleep", "1000.2468"])
            await asyncio.sleep(0.2)
            proc.signal(signal.SIGINT)
            result = await proc.wait()
            assert result.signal == signal.SIGINT and result.shell_status == 130

    arun(go)


def test_a_wait_given_up_by_its_caller_leaves_the_process_usable(server: Any) -> None:
    """asyncio.wait_for cancels a wait() (and a read) mid-way: the cancelled waiter is
    forgotten, and a later wait on the same process still gets the output and the status."""

    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            proc = await conn.start("sleep 0.5; printf done")
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.05)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(proc.stdout.read_chunk(), 0.05)
            assert await proc.stdout.read() == b"done"
            result = await proc.wait()
            assert (result.exit_code, result.stdout) == (0, b"")

    arun(go)


def test_large_stream_iterated_in_chunks(server: Any) -> None:
    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            proc = await conn.start(["head", "-c", str(64 * 1024 * 1024), "/dev/zero"])
            total = 0
            biggest = 0
            async for chunk in proc.stdout:
                assert chunk.count(0) == len(chunk)
                total += len(chunk)
                biggest = max(biggest, len(chunk))
            result = await proc.wait()
            assert total == 64 * 1024 * 1024 and result.ok
            assert biggest <= 256 * 1024

    arun(go)


def test_server_timeout_and_exec_errors(server: Any) -> None:
    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            t0 = time.monotonic()
            r = await conn.run(["sleep", "1000.1357"], timeout=0.5)
            assert r.timed_out and r.shell_status == 124
            assert time.monotonic() - t0 < 5
            with pytest.raises(CommandTimeout):
                r.check()
            with pytest.raises(ExecError, match="not found") as info:
                await conn.run(["definitely-not-a-command-xyz"])
            assert info.value.exit_code == 127
            with pytest.raises(RemoteError, match="not allowed"):
                await conn.run("true", env={"NOT_ALLOWED_VAR": "1"})
            r = await conn.run("echo $REXEC_API_X", env={"REXEC_API_X": "yes"}, cwd="/tmp")
            assert r.stdout == b"yes\n"
            assert (await conn.run("pwd", cwd="/tmp")).stdout == b"/tmp\n"
            # the connection survives all of that
            assert (await conn.run(["echo", "still"])).stdout == b"still\n"

    arun(go)


def test_sync_client(server: Any) -> None:
    with rexec.Client(server.address, token=server.token) as client:
        assert client.run("echo sync").stdout == b"sync\n"
        assert client.run(["cat"], stdin=b"\xff\x00data").stdout == b"\xff\x00data"
        assert client.run("exit 4").exit_code == 4
        with pytest.raises(CommandFailed):
            client.run("false", check=True)


@pytest.mark.skipif(shutil.which("top") is None, reason="no top on this machine")
def test_readme_top_on_a_pty_example_ends(server: Any) -> None:
    """README's example as written: a key typed before top set its terminal up is flushed
    by top (TCSAFLUSH), so the example waits for its first output before typing."""
    with rexec.Client(server.address, token=server.token) as c:
        pty = rexec.PtyRequest("xterm", 24, 80)
        top = c.start("top", stdin=True, pty=pty, timeout=15)  # the deadline: never hang
        next(iter(top.stdout))  # its first screen: it reads keys now
        top.resize(50, 132)
        top.write(b"q")
        result = top.wait()
    assert (result.timed_out, result.exit_code) == (False, 0)


def test_unix_socket(server: Any) -> None:
    async def go() -> None:
        async with rexec.connect(f"unix:{server.unix_path}", token=server.token) as conn:
            assert (await conn.run(["echo", "unix"])).stdout == b"unix\n"

    arun(go)
    with rexec.Client(f"unix:{server.unix_path}", token=server.token) as client:
        assert client.run(["echo", "unix"]).stdout == b"unix\n"


def test_typed_connection_errors(server_factory: Callable[..., Any]) -> None:
    srv = server_factory()
    wrong = rexec.Token(srv.token_obj.key_id, b"\x01" * 32)

    async def wrong_token() -> None:
        await rexec.connect(srv.address, token=wrong)

    with pytest.raises(AuthError, match="authentication failed"):
        arun(wrong_token)
    with pytest.raises(AuthError, match="authentication failed"):
        rexec.Client(srv.address, token=wrong)

    # nothing listens on this port: refused at once, typed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def refused() -> None:
        await rexec.connect(f"127.0.0.1:{port}", token=srv.token)

    with pytest.raises(ConnectionLost, match="cannot connect"):
        arun(refused)

    # a listener that never answers the handshake: the client's deadline fires
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        addr = f"127.0.0.1:{silent.getsockname()[1]}"

        async def stalled() -> None:
            await rexec.connect(addr, token=srv.token, connect_timeout=0.5)

        t0 = time.monotonic()
        with pytest.raises(ConnectTimeout):
            arun(stalled)
        assert time.monotonic() - t0 < 3


# ---- a run() the caller gives up on: the command is killed, as subprocess.run kills ----------


class GaveUp(Exception):
    """The caller's own error, raised from an output sink in the middle of a run()."""


def test_sync_run_abandoned_by_an_exception_kills_the_command(server: Any, e2e: Any) -> None:
    """Ctrl-C (KeyboardInterrupt) or any exception inside Client.run ends the remote command
    at once, as subprocess.run kills its child, not when the connection closes."""
    marker = e2e.marker("1000.")

    def sink(data: bytes | bytearray) -> None:
        raise GaveUp

    with rexec.Client(server.address, token=server.token) as client:
        with pytest.raises(GaveUp):
            client.run(f"echo started; exec sleep {marker}", stdout=sink)
        assert e2e.wait_until(lambda: not e2e.cmdline_pids(marker), 5), "the sleep still runs"
        assert client.run("echo still usable").stdout == b"still usable\n"


def test_async_run_cancelled_kills_the_command(server: Any, e2e: Any) -> None:
    """A task running Connection.run that is cancelled ends the remote command at once."""
    marker = e2e.marker("1000.")

    async def go() -> None:
        async with rexec.connect(server.address, token=server.token) as conn:
            task = asyncio.ensure_future(conn.run(f"exec sleep {marker}"))
            for _ in range(500):
                if e2e.cmdline_pids(marker):
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(500):
                if not e2e.cmdline_pids(marker):
                    break
                await asyncio.sleep(0.01)
            assert not e2e.cmdline_pids(marker), "the sleep still runs"
            assert (await conn.run("echo still usable")).stdout == b"still usable\n"

    arun(go)
