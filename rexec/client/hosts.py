"""Host sets in ClusterShell's NodeSet syntax: `lab[01-40],gpu1!lab07` to hosts and back.

Expansion is plain string concatenation: `lab[01-03]` is lab01 lab02 lab03 (the padding of a
range's start applies to every number), `rack[1-2]-node[1-4]` is their product, and
`127.0.1.[1-200]:9000` puts the port after each address. Operands combine left to right with
`,` (union), `!` (difference), `&` (intersection) and `^` (symmetric difference); `@name` is a
group from the client config's `[groups]`. A set is sorted as ClusterShell sorts it: by the
name with its numbers taken out, then numerically.

Folding is the inverse: every run of digits in a name is one axis, names with the same text
around their digits form one pattern, and the axes of a pattern merge greedily into ranges
(trying both axis orders and keeping the shorter text). Zero padding survives both ways.
`[v6addr]:port` and `unix:/path` names are kept as they are (their brackets are no ranges);
an operator ends a `unix:/path` as any name, so such a path is reached through an alias.

Standard library only and no asyncio: `rexec run` imports this for a host set.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

from rexec.errors import HostSetError

MAX_HOSTS = 100_000  # a bound on one expansion: a typo such as lab[1-10000000] fails fast
_MAX_GROUP_DEPTH = 16
_OPERATORS = ",!&^"
_DIGITS = frozenset("0123456789")
_OPAQUE = frozenset("[]@,!&^/ \t")  # names holding these are not folded (v6, unix:, odd names)

_NUMBER = re.compile("([0-9]+)")

Groups = Mapping[str, Sequence[str]]


# ---- expansion -------------------------------------------------------------------------


def _is_padded(number: str) -> bool:
    return len(number) > 1 and number[0] == "0"


def _parse_ranges(body: str, text: str) -> list[tuple[int, int, int, int]]:
    """`01-10/2,15` -> [(start, stop, step, width)]; width is 0 when not zero-padded."""
    items: list[tuple[int, int, int, int]] = []
    for item in body.replace(" ", "").replace("\t", "").split(","):
        span, slash, step_text = item.partition("/")
        first, dash, last = span.partition("-")
        if not first or (dash and not last) or not _DIGITS.issuperset(first + last):
            raise HostSetError(f"invalid host set {text!r}: bad range {item!r} in [{body}]")
        if slash and (not dash or not step_text.isdecimal() or int(step_text) < 1):
            raise HostSetError(f"invalid host set {text!r}: bad step in {item!r}")
        last = last or first
        start, stop = int(first), int(last)
        if start > stop:
            raise HostSetError(f"invalid host set {text!r}: reversed range {item!r}")
        width = len(first) if _is_padded(first) else 0
        if _is_padded(last) and len(last) != width:
            raise HostSetError(f"invalid host set {text!r}: inconsistent zero padding in {item!r}")
        items.append((start, stop, int(step_text) if slash else 1, width))
    return items


def _range_count(items: list[tuple[int, int, int, int]]) -> int:
    return sum(len(range(start, stop + 1, step)) for start, stop, step, _ in items)


def _range_numbers(items: list[tuple[int, int, int, int]]) -> list[str]:
    return [str(n).zfill(width) for s, e, step, width in items for n in range(s, e + 1, step)]


def _pattern_pieces(text: str, operand: str) -> list[str | list[tuple[int, int, int, int]]]:
    """Split `lab[01-10]-ib[0-1]` into literal text and parsed ranges."""
    pieces: list[str | list[tuple[int, int, int, int]]] = []
    literal: list[str] = []
    pos = 0
    while pos < len(operand):
        char = operand[pos]
        if char == "]":
            raise HostSetError(f"invalid host set {text!r}: ']' without '['")
        if char != "[":
            literal.append(char)
            pos += 1
            continue
        close = operand.find("]", pos)
        if close < 0:
            raise HostSetError(f"invalid host set {text!r}: '[' without ']'")
        body = operand[pos + 1 : close]
        if "[" in body:
            raise HostSetError(f"invalid host set {text!r}: nested '['")
        if ":" in body:  # [v6addr]: an address, not a range
            literal.append(operand[pos : close + 1])
        else:
            if not body.strip():
                raise HostSetError(f"invalid host set {text!r}: empty range []")
            between = "".join(literal)
            if pieces and not isinstance(pieces[-1], str) and _DIGITS.issuperset(between):
                # [1-2][3-4] or [1-2]0[3-4]: where would one number end and the next start?
                raise HostSetError(
                    f"invalid host set {text!r}: ranges must be separated by a non-digit"
                )
            if literal:
                pieces.append(between)
                literal = []
            pieces.append(_parse_ranges(body, text))
        pos = close + 1
    if literal:
        pieces.append("".join(literal))
    return pieces


def _split_operands(text: str) -> list[tuple[str, str]]:
    """[(operator, operand)] at bracket depth 0; the first operator is ','."""
    parts: list[tuple[str, str]] = []
    op, start, depth = ",", 0, 0
    for pos, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif depth == 0 and char in _OPERATORS:
            parts.append((op, text[start:pos].strip()))
            op, start = char, pos + 1
    parts.append((op, text[start:].strip()))
    for _, operand in parts:
        if not operand:
            raise HostSetError(f"invalid host set {text!r}: an empty name or a stray operator")
    return parts


class _Expander:
    """One expansion: the groups it may use, the bound, and the group stack (for cycles)."""

    def __init__(self, groups: Groups | None, where: str | None, limit: int) -> None:
        self.groups = groups
        self.where = where
        self.limit = limit
        self.stack: list[str] = []

    def expand(self, text: str) -> set[str]:
        if not text.strip():
            raise HostSetError("invalid host set '': no hosts")
        result: set[str] = set()
        for op, operand in _split_operands(text):
            hosts = self._operand(text, operand)
            if op == ",":
                result |= hosts
            elif op == "!":
                result -= hosts
            elif op == "&":
                result &= hosts
            else:
                result ^= hosts
            if len(result) > self.limit:
                raise HostSetError(f"host set {text!r} has more than {self.limit} hosts")
        return result

    def _operand(self, text: str, operand: str) -> set[str]:
        if operand.startswith("@"):
            return self._group(operand[1:])
        if operand.startswith("unix:"):
            return {operand}
        pieces = _pattern_pieces(text, operand)
        count = 1
        for piece in pieces:
            if not isinstance(piece, str):
                count *= _range_count(piece)
                if count > self.limit:
                    raise HostSetError(f"host set {text!r} has more than {self.limit} hosts")
        axes = [[piece] if isinstance(piece, str) else _range_numbers(piece) for piece in pieces]
        return {"".join(parts) for parts in itertools.product(*axes)}

    def _group(self, name: str) -> set[str]:
        if self.groups is None or name not in self.groups:
            where = f" in {self.where}" if self.where else ""
            known = ", ".join(sorted(self.groups or ())) or "none"
            raise HostSetError(f"unknown group @{name}{where} (groups: {known})")
        if name in self.stack:
            chain = " -> ".join(f"@{g}" for g in [*self.stack[self.stack.index(name) :], name])
            raise HostSetError(f"groups.{name}: a group that contains itself: {chain}")
        if len(self.stack) >= _MAX_GROUP_DEPTH:
            raise HostSetError(f"groups.{name}: groups nest deeper than {_MAX_GROUP_DEPTH}")
        self.stack.append(name)
        try:
            hosts: set[str] = set()
            for member in self.groups[name]:
                try:
                    hosts |= self.expand(member)
                except HostSetError as exc:
                    if str(exc).startswith("groups."):
                        raise
                    raise HostSetError(f"groups.{name}: {exc}") from None
            return hosts
        finally:
            self.stack.pop()

    def run(self, text: str) -> set[str]:
        """expand(), with the config file named on errors inside a group."""
        try:
            return self.expand(text)
        except HostSetError as exc:
            if self.where and str(exc).startswith("groups."):
                raise HostSetError(f"{self.where}: {exc}") from None
            raise


def _config_groups() -> tuple[Groups, str | None]:
    """The client config's [groups] (host-set strings), and the file they came from."""
    from rexec.client.target import load_client_config

    config = load_client_config()
    groups = {name: entry.hosts for name, entry in config.groups.items()}
    return groups, (str(config.path) if config.path else None)


def expand_hosts(
    text: str,
    *,
    groups: Groups | None = None,
    where: str | None = None,
    limit: int = MAX_HOSTS,
) -> list[str]:
    """The hosts of a set such as `lab[01-03],gpu1`, sorted, each once.

    `@name` uses `groups` (name -> host-set strings); without it, the client config's
    [groups] (`where`, for messages, names the file they come from).
    """
    if groups is None and "@" in text:
        groups, where = _config_groups()
    return sort_hosts(_Expander(groups, where, limit).run(text))


def read_hosts_file(
    path: str, *, groups: Groups | None = None, where: str | None = None, limit: int = MAX_HOSTS
) -> list[str]:
    """The set in a file: one host or host set per line (`#` comments), or one folded line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 * 1024 * 1024)
    except OSError as exc:
        raise HostSetError(f"--hosts-from {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise HostSetError(f"--hosts-from {path}: not UTF-8 text") from None
    expander = _Expander(groups, where, limit)
    hosts: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.partition("#")[0].strip()
        if line:
            try:
                hosts |= expander.run(line)
            except HostSetError as exc:
                raise HostSetError(f"--hosts-from {path}, line {number}: {exc}") from None
            if len(hosts) > limit:
                raise HostSetError(f"--hosts-from {path}: more than {limit} hosts")
    return sort_hosts(hosts)


# ---- order and folding -------------------------------------------------------------------


def _split_name(host: str) -> tuple[str, tuple[str, ...]]:
    """`rack1-node02` -> ("rack%s-node%s", ("1", "02")); opaque names have no axes."""
    if _OPAQUE.intersection(host) or host.startswith("unix:"):
        return host.replace("%", "%%"), ()
    parts = _NUMBER.split(host.replace("%", "%%"))  # text, number, text, ..., text
    return "%s".join(parts[0::2]), tuple(parts[1::2])


def _host_key(host: str) -> tuple[str, tuple[int, ...], str]:
    pattern, numbers = _split_name(host)
    return pattern, tuple(int(n) for n in numbers), host


def sort_hosts(hosts: Iterable[str]) -> list[str]:
    """Hosts in set order: by the name around the numbers, then numerically (lab2 < lab10)."""
    return sorted(set(hosts), key=_host_key)


class _Run:
    """Consecutive numbers printed with one zero padding: 08-10 (width 2), 9-10 (width 0)."""

    __slots__ = ("first", "last", "value", "width")

    def __init__(self, text: str, value: int, width: int) -> None:
        self.first = self.last = text
        self.value = value  # of the last number
        self.width = width

    def __str__(self) -> str:
        return self.first if self.first == self.last else f"{self.first}-{self.last}"


def _fold_numbers(numbers: Iterable[str]) -> str:
    """{"01","02","03","07"} -> "[01-03,07]"; one number alone is bare: "07"."""
    runs: list[_Run] = []
    open_runs: dict[int, _Run] = {}  # the latest run of each padding width
    for text in sorted(numbers, key=lambda n: (int(n), len(n))):
        value = int(text)
        run = next(
            (
                r
                for width, r in open_runs.items()
                if r.value == value - 1 and str(value).zfill(width) == text
            ),
            None,
        )
        if run is None:
            run = _Run(text, value, len(text) if _is_padded(text) else 0)
            runs.append(run)
            open_runs[run.width] = run
        else:
            run.last, run.value = text, value
    if len(runs) == 1 and runs[0].first == runs[0].last:
        return runs[0].first
    runs.sort(key=lambda r: (int(r.first), r.width))
    return "[" + ",".join(str(r) for r in runs) + "]"


Product = tuple[frozenset[str], ...]


def _merge_axis(products: list[Product], axis: int) -> list[Product]:
    """Merge products equal on every other axis: A x {1} and A x {2} -> A x {1,2}."""
    merged: dict[Product, set[str]] = {}
    for product in products:
        key = product[:axis] + product[axis + 1 :]
        merged.setdefault(key, set()).update(product[axis])
    return [(*key[:axis], frozenset(numbers), *key[axis:]) for key, numbers in merged.items()]


def _fold_pattern(pattern: str, rows: list[tuple[str, ...]]) -> list[str]:
    """Fold the hosts of one pattern (given as their numbers) into as few products as fit."""
    dims = len(rows[0])
    if dims == 0:
        return [pattern.replace("%%", "%")]
    if dims == 1:
        return [pattern % _fold_numbers(row[0] for row in rows)]
    single: dict[str, frozenset[str]] = {}
    start: list[Product] = [
        tuple(single.setdefault(n, frozenset((n,))) for n in row) for row in rows
    ]
    best: list[Product] | None = None
    for order in (range(dims - 1, -1, -1), range(dims)):
        products = start
        while True:
            before = len(products)
            for axis in order:
                products = _merge_axis(products, axis)
            if len(products) == before:
                break
        if best is None or len(products) < len(best):
            best = products
    assert best is not None
    best.sort(key=lambda p: tuple(min(int(n) for n in axis) for axis in p))
    return [pattern % tuple(_fold_numbers(axis) for axis in product) for product in best]


def fold_hosts(hosts: Iterable[str]) -> str:
    """The shortest-ish set text naming exactly these hosts: lab01..lab38 -> `lab[01-38]`."""
    by_pattern: dict[str, list[tuple[str, ...]]] = {}
    for host in set(hosts):
        pattern, numbers = _split_name(host)
        by_pattern.setdefault(pattern, []).append(numbers)
    parts: list[str] = []
    for pattern in sorted(by_pattern):
        parts.extend(_fold_pattern(pattern, by_pattern[pattern]))
    return ",".join(parts)
