"""`rexec cp`'s progress display: exact text for a given clock, terminal size and progress."""

from __future__ import annotations

import pytest

from rexec.cli.progress import Progress, format_duration, format_size
from rexec.transfer import TransferProgress

MiB = 1024 * 1024
K = "\x1b[K"  # erase to the end of the line


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(path: str, total_done: int, total: int | None) -> TransferProgress:
    return TransferProgress(path, total_done, total_done, total_done, total, 0, None)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (50 * MiB, "50.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (2 * 1024**6, "2048.0 PiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("secs", "text"), [(0, "0:00"), (4.6, "0:05"), (754, "12:34"), (3723, "1:02:03")]
)
def test_format_duration(secs: float, text: str) -> None:
    assert format_duration(secs) == text


def test_one_host_bar_rate_eta_and_the_final_line() -> None:
    clock = Clock()
    p = Progress(["h"], columns=80, rows=24, clock=clock)
    p.start("h")
    clock.now += 2
    p.update("h", event("dir/big.bin", 50 * MiB, 100 * MiB))
    assert p.due()
    assert p.frame() == (
        "dir/big.bin          50% [=======>         ]   50.0 MiB   25.0 MiB/s  ETA 0:02" + K
    )
    clock.now += 0.0625  # (exact in binary)
    p.update("h", event("dir/big.bin", 60 * MiB, 100 * MiB))
    assert not p.due()  # at most ~10 redraws a second
    clock.now += 0.0625  # (exact in binary)
    assert p.due()
    p.update("h", event("dir/big.bin", 100 * MiB, 100 * MiB))
    p.finish("h", ok=True)
    assert p.close() == (
        "\r\x1b[Jdir/big.bin         100% [=================]  100.0 MiB   47.1 MiB/s  in 0:02"
        + K
        + "\n"
    )


def test_nothing_drawn_nothing_left() -> None:
    p = Progress(["h"], columns=80, rows=24, clock=Clock())
    p.finish("h", ok=False)  # it could not connect: its error line says it all
    assert (p.clear(), p.redraw(), p.close()) == ("", "", "")


def test_the_current_file_names_the_line_and_long_names_keep_their_end() -> None:
    clock = Clock()
    p = Progress(["h"], columns=60, rows=24, clock=clock)
    p.start("h")
    clock.now += 1
    p.update("h", event("a/very/long/directory/name/file.txt", 1024, 4096))
    assert (
        p.frame() == "...me/file.txt  25%    1.0 KiB    1.0 KiB/s  ETA 0:03" + K
    )  # no room for a bar


def test_unknown_total_no_bar_and_no_eta() -> None:
    clock = Clock()
    p = Progress(["h"], columns=80, rows=24, clock=clock)
    p.start("h")
    clock.now += 4
    p.update("h", event("x", 1000, None))
    assert p.frame() == "x                        1000 B      250 B/s  ETA --:--" + K


def test_narrow_terminal_drops_the_bar_then_cuts_the_line() -> None:
    clock = Clock()
    p = Progress(["h"], columns=40, rows=24, clock=clock)
    p.start("h")
    clock.now += 1
    p.update("h", event("f", 1024, 2048))
    assert p.frame() == "f          50%    1.0 KiB    1.0 KiB/s" + K


def test_fan_out_one_line_per_host_redrawn_in_place() -> None:
    clock = Clock()
    p = Progress(["lab01", "lab02:9000"], columns=100, rows=24, clock=clock)
    p.start("lab01")
    p.start("lab02:9000")
    clock.now += 4
    p.update("lab01", event("x", 3 * MiB, 12 * MiB))
    p.update("lab02:9000", event("y", 1000, None))
    first = p.frame()
    assert first == (
        "lab01       25% [======>                       ]    3.0 MiB  768.0 KiB/s  ETA 0:12"
        + K
        + "\nlab02:9000      1000 B      250 B/s  ETA --:--"
        + K
    )
    p.finish("lab01", ok=False)
    # back to the start of the first line, erase to the end of the screen, draw again
    assert p.frame() == (
        "\r\x1b[1A\x1b[J"
        "lab01       25% [======>                       ]    3.0 MiB  failed" + K + "\n"
        "lab02:9000      1000 B      250 B/s  ETA --:--" + K
    )
    assert p.clear() == "\r\x1b[1A\x1b[J"
    assert p.clear() == ""  # nothing drawn any more


def test_past_a_screenful_one_aggregate_line() -> None:
    clock = Clock()
    hosts = [f"h{i:02d}" for i in range(24)]  # 24 rows: 23 lines fit, 24 hosts do not
    p = Progress(hosts, columns=80, rows=24, clock=clock)
    for host in hosts:
        p.update(host, event("x", MiB, 2 * MiB))
    clock.now += 1
    p.finish("h00", ok=True)
    p.finish("h01", ok=False)
    assert p.frame() == (
        "2/24 hosts, 1 failed  52% [=======>        ]   25.0 MiB   25.0 MiB/s  ETA 0:01" + K
    )
    fits = Progress(hosts[:23], columns=80, rows=24, clock=clock)
    assert fits.frame().count("\n") == 22  # one line per host


def test_a_remote_name_cannot_drive_the_terminal() -> None:
    """The current file's name comes from the server on a download: its control characters
    show as `?`, so the only escapes in a frame are the display's own."""
    clock = Clock()
    progress = Progress(["h"], columns=80, clock=clock)
    progress.start("h")
    progress.update("h", event("\x1b]0;pwned\x07\x1b[2J\nx", 10, 100))
    clock.now += 1
    frame = progress.frame()
    assert "?]0;pwned??[2J?x" in frame
    assert frame.replace(K, "").isprintable()
