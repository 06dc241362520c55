"""`python -m rexec` is the same as the `rexec` command."""

from __future__ import annotations

import sys

from rexec.cli.main import main

sys.exit(main())
