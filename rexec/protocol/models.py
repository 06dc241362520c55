"""pydantic model of the EXEC request, validated where it is received: on the server."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rexec.errors import RemoteProtocolError
from rexec.protocol.messages import MAX_WINDOW
from rexec.protocol.pty import PtyRequest, modes_problem, size_problem, term_problem

MAX_ARGS = 4096
MAX_ENV = 1024


class PtyModel(BaseModel):
    """EXEC's `pty` member: the checks are rexec.protocol.pty's, shared with the client."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    term: str
    rows: int
    cols: int
    modes: dict[str, int | bool] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _check(self) -> PtyModel:
        problem = (
            term_problem(self.term)
            or size_problem(self.rows, self.cols)
            or modes_problem(self.modes)
        )
        if problem is not None:
            raise ValueError(problem)
        return self

    def request(self) -> PtyRequest:
        return PtyRequest(self.term, self.rows, self.cols, self.modes)


class ExecRequest(BaseModel):
    """What to run: exactly one of argv (no shell) or command (run by /bin/sh -c)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    argv: tuple[str, ...] | None = Field(default=None, max_length=MAX_ARGS)
    command: str | None = None
    env: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENV)
    cwd: str | None = None
    timeout: float | None = None
    stdin: bool = False
    window: int = Field(ge=0, le=MAX_WINDOW)  # the channel's initial output window
    pty: PtyModel | None = None  # a pseudo-terminal for the command (PROTOCOL.md 10.2.1)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout_number(cls, value: object) -> object:
        # JSON has one number type; accept ints for timeout even in strict mode.
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # a 400-digit integer: not a ValueError, pydantic would leak it
                raise ValueError("'timeout' is too large") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> ExecRequest:
        if (self.argv is None) == (self.command is None):
            raise ValueError("exactly one of 'argv' or 'command' is required")
        if self.argv is not None and not self.argv:
            raise ValueError("'argv' must not be empty")
        for text in (*(self.argv or ()), self.command or "", self.cwd or ""):
            if "\0" in text:
                raise ValueError("NUL bytes are not allowed in argv, command or cwd")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"invalid environment variable name or value: {key[:64]!r}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError("'timeout' must be a positive number of seconds")
        return self


def parse_exec_request(body: bytes) -> ExecRequest:
    """Validate an EXEC body; any problem is a RemoteProtocolError with pydantic's reason."""
    try:
        return ExecRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        raise RemoteProtocolError(f"invalid EXEC request: {where}: {first['msg']}") from None
