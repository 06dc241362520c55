"""Line editing for `rexec shell`'s REPL: stdlib readline with tab-completion of the shell's
own words, and a history file kept across sessions (apart from the REPL's command semantics
in shell.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

HISTORY_KEEP = 5000  # lines kept in the history file (trimmed at start-up)


def history_path(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_STATE_HOME/rexec/history, else ~/.local/state/rexec/history (XDG ignores relative)."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "rexec" / "history"


class LineEditor:
    """stdlib readline: editing, tab-completion (`words` first, then `word_args[word]` after
    one of them), history appended line by line (a killed shell loses nothing; concurrent
    shells interleave instead of overwriting). `warn` says why history is off, if it is."""

    def __init__(
        self,
        path: Path,
        words: Sequence[str],
        word_args: Mapping[str, Sequence[str]],
        warn: Callable[[str], None],
    ) -> None:
        import readline

        self.rl = readline
        self.words, self.word_args = words, word_args
        self.path: Path | None = path
        readline.set_auto_history(False)
        readline.set_completer(self.complete)
        readline.set_completer_delims(" \t\n")
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            os.chmod(path, 0o600)
            readline.read_history_file(path)
            if readline.get_current_history_length() > 2 * HISTORY_KEEP:
                readline.set_history_length(HISTORY_KEEP)
                readline.write_history_file(path)
                readline.set_history_length(-1)
        except OSError as exc:
            warn(f"history disabled: {path}: {exc.strerror or exc}")
            self.path = None

    def read(self, prompt: str) -> str:
        line = input(prompt)
        rl = self.rl
        n = rl.get_current_history_length()
        if line.strip() and (n == 0 or rl.get_history_item(n) != line):
            rl.add_history(line)
            if self.path is not None:
                try:
                    rl.append_history_file(1, self.path)
                except OSError:
                    self.path = None
        return line

    def complete(self, text: str, state: int) -> str | None:
        rl = self.rl
        before = rl.get_line_buffer()[: rl.get_begidx()].split()
        if not before:
            options = [w for w in self.words if w.startswith(text)]
        elif len(before) == 1 and before[0] in self.word_args:
            options = [a for a in self.word_args[before[0]] if a.startswith(text)]
        else:
            options = []
        # Python's readline appends nothing to a completion, so add the space ourselves
        return options[state] + " " if state < len(options) else None
