"""String arguments validated by coercion into an enum, with one error message shape everywhere."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from phalanx.errors import UsageError

E = TypeVar("E", bound=Enum)


def coerce_enum(enum_cls: type[E], value: E | str, what: str, error: type[ValueError] = UsageError) -> E:
    """`value` as a member of `enum_cls`, or `error` naming the bad value and the allowed ones."""
    try:
        return enum_cls(value)
    except ValueError:
        raise error(f"unknown {what} {value!r}; allowed: {[m.value for m in enum_cls]}") from None
