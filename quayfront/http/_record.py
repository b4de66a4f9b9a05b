"""
L{frozen_record}: a frozen dataclass that is cheap to build and to read.

A frozen dataclass's generated C{__init__} stores each field through
C{object.__setattr__} (its own C{__setattr__} refuses), one call per field:
for the records quayfront builds on every request (the access-log entry
has 22 fields) that is most of their cost.  The C{__init__} made here takes
the same arguments, with the same defaults and default factories, and
stores every field in one dictionary update; everything else (field
metadata, C{dataclasses.replace}, equality, repr, refusing assignment) is
the dataclass's.

The fields are stored from a dict display, whatever their number: updating
an instance's empty dictionary from a fresh dict display clones that dict's
keys, so the instance's dictionary is a table of its own, which CPython
3.11 reads fields from by a cached hint.  Stored one at a time (from pairs,
say) into the class's shared keys, every later read of a field would take
the generic attribute lookup instead (measured: about 320 instructions a
field, against a few).

L{maker} gives a function with the same parameters that builds a record
without calling its class: a class called with keyword arguments gathers
them into a dictionary and unpacks it again for C{__init__}, about half of
what building the access-log entry costs.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Callable, TypeVar

T = TypeVar("T")


class _Factory:
    """The default of an argument whose field has a default factory."""

    def __repr__(self) -> str:
        return "<factory>"


def frozen_record(cls: type[T]) -> type[T]:
    """
    C{@dataclass(frozen=True)} with an C{__init__} that stores the fields
    in one go, and a L{maker}.  Not for classes with C{__post_init__},
    C{InitVar}s, fields left out of C{__init__} or slots.
    """
    cls = dataclass(frozen=True)(cls)
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        raise TypeError(f"{cls.__name__}: frozen_record does not support this class")
    namespace: dict[str, object] = {"_new": object.__new__, "_cls": cls}
    parameters = []
    stored = []
    for index, spec in enumerate(fields(cls)):
        if not spec.init:
            raise TypeError(f"{cls.__name__}.{spec.name}: frozen_record needs init fields")
        name = spec.name
        if spec.default is not MISSING:
            namespace[f"_default_{index}"] = spec.default
            parameters.append(f"{name}=_default_{index}")
            stored.append(f"{name!r}: {name}")
        elif spec.default_factory is not MISSING:
            namespace[f"_factory_{index}"] = spec.default_factory
            namespace[f"_made_{index}"] = _Factory()
            parameters.append(f"{name}=_made_{index}")
            stored.append(f"{name!r}: _factory_{index}() if {name} is _made_{index} else {name}")
        else:
            parameters.append(name)
            stored.append(f"{name!r}: {name}")
    store = f"self.__dict__.update({{{', '.join(stored)}}})"
    source = (
        f"def __init__(self, {', '.join(parameters)}):\n    {store}\n"
        f"def make({', '.join(parameters)}):\n    self = _new(_cls)\n    {store}\n"
        "    return self\n"
    )
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init
    make = namespace["make"]
    make.__name__ = make.__qualname__ = f"make_{cls.__name__}"
    make.__module__ = cls.__module__
    make.__doc__ = f"A new L{{{cls.__qualname__}}}, built without calling the class."
    cls._frozen_record_maker = make
    return cls


def maker(cls: type[T]) -> Callable[..., T]:
    """
    The function that builds a record of C{cls} (a L{frozen_record}) from
    the arguments C{cls} takes, without calling C{cls}: the same record,
    at a fraction of the cost of a call with keyword arguments.
    """
    return cls._frozen_record_maker  # type: ignore[attr-defined]
