"""fast_init: the value types built on every request keep the constructor, the defaults and the immutability the
dataclass gave them."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import typing
from dataclasses import InitVar, dataclass, field
from typing import Any

import pytest

from sa_middleware.context import RequestInfo, SAContext
from sa_middleware.denials import Denial
from sa_middleware.dpop import Binding, Proof
from sa_middleware.frozen import fast_init
from sa_middleware.guard import Admitted
from sa_middleware.policy import RouteMatch
from sa_middleware.records import AuditRecord, LockHolder, LockRequest, Marker, Ticket

BUILT_PER_REQUEST = [RequestInfo, SAContext, Denial, Binding, Proof, Admitted, RouteMatch, LockRequest, Marker,
                     LockHolder, Ticket, AuditRecord]


def _reference(cls: type) -> type:
    """The same fields in a class the dataclass decorator alone builds."""
    fields = [(f.name, f.type, field(default=f.default, default_factory=f.default_factory))  # type: ignore[call-overload]
              for f in dataclasses.fields(cls)]
    namespace = {"__post_init__": cls.__post_init__} if hasattr(cls, "__post_init__") else {}
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True, slots=True, namespace=namespace)


@pytest.mark.parametrize("cls", BUILT_PER_REQUEST, ids=lambda c: c.__name__)
def test_the_constructor_takes_what_the_dataclass_took(cls: type) -> None:
    assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"  # the fast one is in place
    ours = inspect.signature(cls).parameters
    theirs = inspect.signature(_reference(cls)).parameters
    assert list(ours) == list(theirs)
    for name, parameter in ours.items():
        reference = theirs[name]
        assert parameter.kind == reference.kind
        if reference.default is inspect.Parameter.empty or repr(reference.default) == "<factory>":
            assert repr(parameter.default) == repr(reference.default), name
        else:
            assert parameter.default == reference.default, name


@pytest.mark.parametrize("cls", BUILT_PER_REQUEST, ids=lambda c: c.__name__)
def test_the_constructor_annotations_resolve(cls: type) -> None:
    hints = typing.get_type_hints(cls.__init__)  # tools reading the constructor (documentation, injection)
    assert set(hints) == {f.name for f in dataclasses.fields(cls)} | {"return"}
    inspect.signature(cls, eval_str=True)


def test_instances_are_frozen_equal_and_picklable() -> None:
    ticket = Ticket("t1", "alice", "s1", {"object:1": 7}, 12.5, iss="https://idp")
    assert ticket == Ticket(ticket_id="t1", sub="alice", session_id="s1", fencing_tokens={"object:1": 7}, expires=12.5,
                            iss="https://idp")
    assert ticket.iss == "https://idp" and Ticket("t1", "alice", "s1", {}, 1.0).iss == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        ticket.sub = "mallory"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(ticket)) == ticket
    assert dataclasses.replace(ticket, sub="bob").sub == "bob"
    assert repr(ticket).startswith("Ticket(ticket_id='t1', sub='alice'")


def test_arguments_are_checked_as_before() -> None:
    with pytest.raises(TypeError):
        Ticket("t1", "alice")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        RequestInfo("GET", "/", {}, nonsense=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        LockRequest("k", "exclusive", "extra")  # type: ignore[call-arg]


def test_factories_give_each_instance_its_own_value() -> None:
    first, second = SAContext("alice", "human", "s1"), SAContext("bob", "human", "s2")
    assert first.claims == {} and first.claims is not second.claims
    assert first.fencing_tokens is not second.fencing_tokens and first.params is not second.params
    given: dict[str, Any] = {"sub": "alice"}
    assert SAContext("alice", "human", "s1", given).claims is given


def test_post_init_still_runs() -> None:
    with pytest.raises(ValueError, match="unknown denial code"):
        Denial("no_such_code")
    record = AuditRecord("denial", "invalid_token", "middleware", "\ud800x")
    assert record.sub == "\\ud800x"  # escaped: no store could write a lone surrogate


def test_classes_it_cannot_build_exactly_are_refused() -> None:
    @dataclass(slots=True)
    class Mutable:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class KeywordOnly:
        a: int = field(kw_only=True)

    @dataclass(frozen=True, slots=True)
    class NotInInit:
        a: int = field(init=False, default=1)

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: InitVar[int]

        def __post_init__(self, b: int) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Base:
        a: int

    @dataclass(frozen=True, slots=True)
    class Inherits(Base):
        b: int = 0

    for cls in (Mutable, NoSlots, KeywordOnly, NotInInit, WithInitVar, Inherits):
        with pytest.raises(TypeError, match="fast_init"):
            fast_init(cls)
