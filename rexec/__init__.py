"""rexec: run commands on remote machines over an authenticated, encrypted, framed channel.

The public API is loaded lazily (PEP 562) so that `rexec run` pays only for what it uses.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__: list[str] = []
