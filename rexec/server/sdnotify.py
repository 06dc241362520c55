"""systemd's notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET, no library.

The message is newline-separated KEY=VALUE lines (READY=1, STOPPING=1, STATUS=...). The socket
is a unix datagram socket named by a path, or by an abstract name written with a leading "@"
(sent with a leading NUL byte). Without $NOTIFY_SOCKET (not under systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send message to the service manager; True if sent, False without $NOTIFY_SOCKET.

    OSError (the socket is gone, or refuses us) propagates: the caller logs it.
    """
    name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not name:
        return False
    if name.startswith("@"):
        address = "\0" + name[1:]
    elif name.startswith("/"):
        address = name
    else:  # vsock:... and other transports of newer systemd: not for us
        raise OSError(f"unsupported NOTIFY_SOCKET address {name!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)
    return True
