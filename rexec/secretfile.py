"""Reading secret files (token stores, token files): owner-only, checked on the open fd.

One place for the rule "refuse secret files readable by others": the mode is checked with
fstat on the descriptor we then read, so there is no window between check and read.
Standard library only: `rexec run` reads a token file on its start-up path. The server reads
its token store with `trusted=True`: the StrictModes rule of rexec.statefile applies on top.
"""

from __future__ import annotations

import os
import stat

from rexec.errors import ConfigError


def check_mode(path: str, mode: int, what: str) -> None:
    """Refuse any group or other permission bit, naming the fix."""
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} has mode {mode:04o}: group and others must have no access; "
            f"fix it with: chmod 600 {path}"
        )


def read_secret_file(
    path: str, what: str, limit: int | None = None, *, trusted: bool = False
) -> tuple[bytes, os.stat_result] | None:
    """The file's bytes and stat, or None when it does not exist (the caller decides).

    With `limit`, at most limit + 1 bytes are read, so the caller can refuse a file that
    is too large without reading all of it. With `trusted`, the file must also pass
    rexec.statefile's StrictModes rule (owner, no symbolic link, safe directories).
    """
    if trusted:
        from rexec.statefile import open_trusted

        try:
            fd, st = open_trusted(path, os.O_RDONLY, what)
        except FileNotFoundError:
            return None
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        check_mode(path, stat.S_IMODE(st.st_mode), what)
        want = st.st_size + 1 if limit is None else limit + 1
        chunks: list[bytes] = []
        got = 0
        while got < want and (chunk := os.read(fd, want - got)):
            chunks.append(chunk)
            got += len(chunk)
            if limit is None:  # the file may have grown since fstat: read to EOF
                want = got + 65536
    finally:
        os.close(fd)
    return b"".join(chunks), st
