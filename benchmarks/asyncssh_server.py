"""The asyncssh peer's server: a separate process with its own event loop.

    python -m benchmarks.asyncssh_server --host-key K --authorized-keys A --ready-file R

Listens on 127.0.0.1:0, writes the bound port to the ready file, and runs each exec request
as `/bin/sh -c COMMAND` (as sshd does with the login shell), pumping stdin, stdout and stderr
both ways, then reports the exit status. Serves SFTP with asyncssh's own SFTP server (the
local file system, absolute paths). Exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

import asyncssh

CHUNK = 256 * 1024


async def _pump_out(reader: asyncio.StreamReader, writer: asyncssh.SSHWriter[bytes]) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return
        writer.write(data)
        await writer.drain()


async def _pump_in(reader: asyncssh.SSHReader[bytes], writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (BrokenPipeError, ConnectionResetError, asyncssh.Error):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
    command = process.command or "true"
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    feeder = asyncio.ensure_future(_pump_in(process.stdin, proc.stdin))
    try:
        await asyncio.gather(
            _pump_out(proc.stdout, process.stdout), _pump_out(proc.stderr, process.stderr)
        )
        status = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        feeder.cancel()
        with contextlib.suppress(BaseException):
            await feeder
    process.exit(status if status >= 0 else 128 - status)


async def serve(args: argparse.Namespace) -> None:
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[args.host_key],
        authorized_client_keys=args.authorized_keys,
        process_factory=handle,
        encoding=None,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        sftp_factory=True,  # asyncssh's own SFTP server on the local files (xfer-big)
        login_timeout=60,
    )
    port = server.get_port()
    tmp = Path(args.ready_file + ".tmp")
    tmp.write_text(f"127.0.0.1:{port}\n")
    tmp.replace(args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    # Exit if the benchmark that started us goes away without stopping us.
    parent = os.getppid()
    for _ in range(10_000_000):  # bounded: ~115 days at 1 s per check
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        if stop.is_set() or os.getppid() != parent:
            break
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), timeout=3.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host-key", required=True)
    p.add_argument("--authorized-keys", required=True)
    p.add_argument("--ready-file", required=True)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
