"""Frozen value types that are cheap to build: a request builds several (its RequestInfo, the match, the ticket, the
view's context), so their constructors sit on the hot path."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, TypeVar

__all__ = ["fast_init"]

T = TypeVar("T")

_PREFIX = "_fast_init_"  # the generated constructor's own names (no field may start with it)


class _Factory:
    """The default shown for a field built by its ``default_factory`` when not given (as dataclasses show it)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def fast_init(cls: type[T]) -> type[T]:
    """Give a ``@dataclass(frozen=True, slots=True)`` class a constructor that fills its slots directly.

    The constructor the dataclass generates sets each field through ``object.__setattr__`` to get past the frozen
    ``__setattr__``, about three times slower than writing the slot. This one takes the same arguments (positional
    or keyword, same defaults; a field with a ``default_factory`` calls it when not given), calls ``__post_init__``
    as the generated one does, and the instances stay frozen: assigning a field still raises
    :class:`dataclasses.FrozenInstanceError`. A class this cannot reproduce exactly is refused at import.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"fast_init needs a @dataclass(frozen=True, slots=True) class, not {cls.__name__}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if list(inspect.signature(cls.__init__).parameters)[1:] != [f.name for f in fields]:  # an InitVar, say
        raise TypeError(f"fast_init cannot build {cls.__name__}: its constructor takes more than its fields")
    names: dict[str, Any] = {f"{_PREFIX}factory": _FACTORY}
    args: list[str] = []
    body: list[str] = []
    for i, f in enumerate(fields):
        if f.name.startswith(_PREFIX) or f.name == "self" or not f.init or f.kw_only or f.name not in cls.__dict__:
            raise TypeError(f"fast_init cannot build {cls.__name__}.{f.name}")  # not in __dict__: inherited
        names[f"{_PREFIX}set{i}"] = cls.__dict__[f.name].__set__  # the slot's own descriptor
        if f.default is not dataclasses.MISSING:
            names[f"{_PREFIX}default{i}"] = f.default
            args.append(f"{f.name}={_PREFIX}default{i}")
            value = f.name
        elif f.default_factory is not dataclasses.MISSING:
            names[f"{_PREFIX}factory{i}"] = f.default_factory
            args.append(f"{f.name}={_PREFIX}factory")
            value = f"{_PREFIX}factory{i}() if {f.name} is {_PREFIX}factory else {f.name}"
        else:
            args.append(f.name)
            value = f.name
        body.append(f"  {_PREFIX}set{i}(self, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("  self.__post_init__()")
    source = (f"def {_PREFIX}make({', '.join(names)}):\n"
              f" def __init__(self, {', '.join(args)}):\n" + "\n".join(body or ["  pass"]) + "\n"
              " return __init__\n")
    namespace: dict[str, Any] = {}
    # run in the class's module, as the dataclass's own constructor is: its annotations resolve there
    exec(source, sys.modules[cls.__module__].__dict__, namespace)
    init = namespace[f"{_PREFIX}make"](**names)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
