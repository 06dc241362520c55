"""The live processes of this machine as /proc shows them: one reader for the exec layer.

Zombies (and dead tasks) are left out: they run nothing and hold no pipe or terminal.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def live_processes() -> Iterator[tuple[int, int]]:
    """(process group, session) of every live process; nothing if /proc is unreadable."""
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # exited while we looked
                continue
            # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
            fields = stat[stat.rfind(b")") + 2 :].split(b" ", 5)
            if len(fields) >= 5 and fields[0] not in (b"Z", b"X"):
                yield int(fields[2]), int(fields[3])


def live_members(pgid: int) -> bool:
    """Whether a non-zombie process is in group pgid.

    kill(-pgid, 0) also succeeds for zombies, and orphans wait for their reaper (PID 1, which
    can be slow in containers); a zombie runs nothing and holds no pipe, so it counts as gone.
    """
    if not os.path.isdir("/proc"):
        return True
    return any(pgrp == pgid for pgrp, _ in live_processes())
