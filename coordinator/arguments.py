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
    spec = _spec(handler.__func__)
    unknown = args.keys() - spec.names
    if unknown and not spec.any_keyword:
        raise MetaError(errno.EINVAL, f"bad arguments for {method}: unexpected "
                                      f"{', '.join(sorted(map(str, unknown)))}")
    missing = spec.required - args.keys()
    if missing:
        raise MetaError(errno.EINVAL, f"bad arguments for {method}: missing "
                                      f"{', '.join(sorted(missing))}")
    hints = spec.hints
    for name, value in args.items():
        expected = hints.get(name)
        if expected is not None and not fits(value, expected):
            raise MetaError(errno.EINVAL, f"bad arguments for {method}: {name} must be "
                                          f"{_describe(expected)}, not {type(value).__name__}")


class _Spec(typing.NamedTuple):
    names: frozenset[str]  # what may be given by keyword
    required: frozenset[str]  # what must be
    any_keyword: bool  # a **kwargs takes the rest
    hints: dict[str, Any]


@functools.cache
def _spec(function) -> _Spec:
    """What a handler takes after self and the request, once per function (keyed by
    the function, not the bound method, so no service is kept alive). Checking sets,
    not binding a signature, keeps this cheap on every request."""
    parameters = list(inspect.signature(function).parameters.values())[2:]
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    hints = typing.get_type_hints(function)
    hints.pop("return", None)
    return _Spec(
        names=frozenset(p.name for p in parameters if p.kind in keyword),
        required=frozenset(p.name for p in parameters
                           if p.kind in keyword and p.default is inspect.Parameter.empty),
        any_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters),
        hints=hints)


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
