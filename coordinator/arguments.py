"""A request's arguments, checked against its handler's signature before the call.

A peer, even one holding the cluster key, may send a request whose arguments are
missing, unknown, or of the wrong type. That is bad input, answered with EINVAL
before anything runs, so it can never reach the journal. Checking up front, and
not catching TypeError around the call, also keeps a TypeError raised inside a
handler what it is: a bug, logged with its traceback.
"""

from __future__ import annotations

import errno
import functools
import inspect
import types
import typing
from typing import Any

from csvfs.cluster.errors import MetaError


def check_arguments(method: str, handler, args: dict) -> None:
    """Raise MetaError(EINVAL) unless the bound method `handler(<session>, **args)` fits
    its signature and every argument has the annotated type."""
    signature, hints = _spec(handler.__func__)
    try:
        signature.bind(None, **args)
    except TypeError as exc:
        raise MetaError(errno.EINVAL, f"bad arguments for {method}: {exc}") from None
    for name, value in args.items():
        expected = hints.get(name)
        if expected is not None and not fits(value, expected):
            raise MetaError(errno.EINVAL, f"bad arguments for {method}: {name} must be "
                                          f"{_describe(expected)}, not {type(value).__name__}")


@functools.cache
def _spec(function) -> tuple[inspect.Signature, dict[str, Any]]:
    """The signature without self, and the resolved annotations, once per function
    (keyed by the function, not the bound method, so no service is kept alive)."""
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    hints.pop("return", None)
    return signature.replace(parameters=list(signature.parameters.values())[1:]), hints


def fits(value: Any, expected: Any) -> bool:
    """Is value, as msgpack decodes it, of the annotated type? bool is not an int here."""
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        return type(value) is list and all(fits(each, item) for each in value)
    if origin is tuple:  # a fixed-length msgpack array, which decodes as a list
        items = typing.get_args(expected)
        return (type(value) is list and len(value) == len(items)
                and all(fits(each, item) for each, item in zip(value, items, strict=True)))
    if origin is dict:
        return type(value) is dict
    if expected is Any:
        return True
    if expected is int:
        return type(value) is int
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) in (types.UnionType, typing.Union):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if expected is type(None):
        return "nil"
    if typing.get_origin(expected) is not None:
        return str(expected)  # list[int], say
    return getattr(expected, "__name__", str(expected))
