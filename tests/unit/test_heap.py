"""rexec.heap pins glibc's malloc thresholds (the cause and figures are in its docstring)."""

from __future__ import annotations

import pytest


def test_keep_heap_calls_mallopt_with_the_pinned_values(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    import rexec.heap as heap

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        class mallopt:  # mimics the C function object
            argtypes: list[object] = []

            def __new__(cls, option: int, value: int) -> int:  # type: ignore[misc]
                calls.append((option, value))
                return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc)
    monkeypatch.setattr(heap, "_done", False)
    heap.keep_heap()
    heap.keep_heap()
    assert calls == [
        (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD),
        (heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD),
    ]
