"""
L{frozen_record}: a frozen dataclass that is cheap to build.

A frozen dataclass's generated C{__init__} stores each field through
C{object.__setattr__} (its own C{__setattr__} refuses), one call per field:
for the records quayfront builds on every request (the access-log entry
has 22 fields) that is most of their cost.  The C{__init__} made here takes
the same arguments, with the same defaults and default factories, and
stores every field in one dictionary update; everything else (field
metadata, C{dataclasses.replace}, equality, repr, refusing assignment) is
the dataclass's.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import TypeVar

T = TypeVar("T")


#: Up to this many fields, CPython builds a dict display with constant keys
#: in one instruction.
_CONST_MAP_FIELDS = 15


class _Factory:
    """The default of an argument whose field has a default factory."""

    def __repr__(self) -> str:
        return "<factory>"


def frozen_record(cls: type[T]) -> type[T]:
    """
    C{@dataclass(frozen=True)} with an C{__init__} that stores the fields
    in one go.  Not for classes with C{__post_init__}, C{InitVar}s, fields
    left out of C{__init__} or slots.
    """
    cls = dataclass(frozen=True)(cls)
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        raise TypeError(f"{cls.__name__}: frozen_record does not support this class")
    namespace: dict[str, object] = {"_zip": zip}
    parameters = []
    stored = []
    names = []
    made = []
    for index, spec in enumerate(fields(cls)):
        if not spec.init:
            raise TypeError(f"{cls.__name__}.{spec.name}: frozen_record needs init fields")
        name = spec.name
        names.append(name)
        if spec.default is not MISSING:
            namespace[f"_default_{index}"] = spec.default
            parameters.append(f"{name}=_default_{index}")
            stored.append(f"{name!r}: {name}")
        elif spec.default_factory is not MISSING:
            namespace[f"_factory_{index}"] = spec.default_factory
            namespace[f"_made_{index}"] = _Factory()
            parameters.append(f"{name}=_made_{index}")
            stored.append(f"{name!r}: _factory_{index}() if {name} is _made_{index} else {name}")
            made.append(f"    if {name} is _made_{index}:\n        {name} = _factory_{index}()\n")
        else:
            parameters.append(name)
            stored.append(f"{name!r}: {name}")
    if len(names) <= _CONST_MAP_FIELDS:
        body = f"    self.__dict__.update({{{', '.join(stored)}}})\n"
    else:
        # A dict display this long is built one item at a time (three
        # instructions each); the values as one tuple zipped with the
        # names take one each.
        namespace["_names"] = tuple(names)
        body = "".join(made) + (
            f"    self.__dict__.update(_zip(_names, ({', '.join(names)},)))\n"
        )
    source = f"def __init__(self, {', '.join(parameters)}):\n" + body
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init
    return cls
