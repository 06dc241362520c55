"""rexec/2, sans-I/O: bytes in, events out; calls in, bytes out.

Nothing in this package may import asyncio, socket, selectors, subprocess or structlog
(tests/protocol/test_sans_io.py enforces it), so every transport can drive it.
"""
