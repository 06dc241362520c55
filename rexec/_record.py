"""Small value classes without `dataclasses`, for the `rexec run` start-up path.

`rexec run` is a process per command, so its imports are its latency (DESIGN.md 2a):
`import dataclasses` pulls in inspect, dis and tokenize (~7-15 ms), and every @dataclass
costs a few hundred microseconds to create. The value classes the client imports are plain
__slots__ classes on these bases instead. A subclass names its fields in constructor order
(`__match_args__ = ("a", "b")`, as @dataclass would set it), stores them in slots
(`__slots__ = __match_args__`), annotates them and writes its own __init__.
"""

from __future__ import annotations


class Record:
    """Equality, hash, repr and pickling from the fields named in __match_args__."""

    __slots__: tuple[str, ...] = ()
    __match_args__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self.__match_args__])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join([f"{name}={getattr(self, name)!r}" for name in self.__match_args__])
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[type[Record], tuple[object, ...]]:
        return (type(self), self._fields())


class FrozenRecord(Record):
    """A Record whose fields cannot be reassigned; __init__ sets them with setfield."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")


setfield = object.__setattr__  # how a FrozenRecord's __init__ sets its fields
