"""One rule for every options dataclass: options given as an object, as keyword arguments, or
both (the keywords replace those fields), always validated by the dataclass itself."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from shardfit.errors import InvalidOptionError

__all__ = ["merge_options"]

T = TypeVar("T")


def merge_options(cls: type[T], options: T | None, overrides: dict[str, Any]) -> T:
    """``options`` (default: ``cls()``) with the fields in ``overrides`` replaced.

    Raises:
        InvalidOptionError: ``options`` is not a ``cls``, an override names no field of it, or
            a value breaks its field's rule.
    """
    if options is not None and not isinstance(options, cls):
        raise InvalidOptionError(f"options must be a {cls.__name__} or None. Received: {options!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InvalidOptionError(
            f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; the options are "
            f"{', '.join(sorted(names))}"
        )
    if options is None:
        return cls(**overrides)
    return dataclasses.replace(options, **overrides)  # type: ignore[type-var]
