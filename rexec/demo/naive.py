"""The classic tutorial pair, faithfully naive: one recv(1024) is taken to be one message.

Nothing here marks where a message ends. TCP delivers a byte stream, so a reply longer
than the buffer is cut, two sends can arrive as one recv, and an empty send puts nothing
at all on the wire. The scenarios show each of these with real bytes.

The tutorial, in short (this module is the same code, with timeouts and a log added):

    # server                                # client
    while True:                             while True:
        cmd = conn.recv(1024)                   cmd = input("> ")
        if not cmd:                             s.send(cmd.encode())
            break                               print(s.recv(1024).decode())
        out = subprocess.run(cmd, shell=True, capture_output=True)
        conn.send(out.stdout + out.stderr)
"""

from __future__ import annotations

import socket
import time

from rexec.demo.loopback import ServerLog, Settle, run_command

RECV_SIZE = 1024  # the tutorial's buffer size
MAX_COMMANDS = 8


def send(sock: socket.socket, message: bytes) -> int:
    """The tutorial's send: no length, no delimiter; returns what send() returned."""
    return sock.send(message)


def recv(sock: socket.socket) -> bytes:
    """The tutorial's receive: whatever one recv(1024) returns is "the reply"."""
    return sock.recv(RECV_SIZE)


def serve(conn: socket.socket, log: ServerLog, settle: Settle | None = None) -> None:
    """The tutorial's server loop: recv a command, run it, send back its output.

    `settle(conn, n)` runs before the n-th recv so a scenario can let bytes pile up first;
    it never changes what the loop does with them.
    """
    for index in range(MAX_COMMANDS):
        if time.monotonic() > log.deadline:
            log.error = "server deadline reached"
            return
        if settle is not None:
            settle(conn, index)
        log.waiting_in_recv = True
        command = conn.recv(RECV_SIZE)
        log.waiting_in_recv = False
        if not command:  # the tutorial reads b'' as "the client went away"
            log.saw_eof = True
            return
        log.received.append(command)
        output = run_command(command)
        sent = conn.send(output)  # send, not sendall, and no length: as in the tutorial
        log.sent.append(output[:sent])
        log.replies.release()
