"""The server: listeners and limits, sessions, process lifetime, tokens and config."""
