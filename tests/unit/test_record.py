"""
quayfront.http._record.frozen_record: a frozen dataclass built by one
dictionary update, which must behave as C{@dataclass(frozen=True)} does.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from quayfront.http._record import frozen_record


@frozen_record
class Sample:
    first: int
    second: bytes
    named: str = "-"
    mapping: dict[str, str] = dataclasses.field(default_factory=dict)
    hidden: bytes = dataclasses.field(default=b"", repr=False)


@dataclasses.dataclass(frozen=True)
class Reference:
    first: int
    second: bytes
    named: str = "-"
    mapping: dict[str, str] = dataclasses.field(default_factory=dict)
    hidden: bytes = dataclasses.field(default=b"", repr=False)


def test_takes_the_arguments_a_frozen_dataclass_takes():
    assert [
        (parameter.name, parameter.kind, parameter.default is inspect.Parameter.empty)
        for parameter in inspect.signature(Sample).parameters.values()
    ] == [
        (parameter.name, parameter.kind, parameter.default is inspect.Parameter.empty)
        for parameter in inspect.signature(Reference).parameters.values()
    ]
    with pytest.raises(TypeError):
        Sample(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Sample(1, b"", unknown=3)  # type: ignore[call-arg]


def test_stores_values_and_defaults():
    record = Sample(1, b"x", hidden=b"h")
    assert (record.first, record.second, record.named, record.mapping, record.hidden) == (
        1, b"x", "-", {}, b"h",
    )
    assert repr(record) == "Sample(first=1, second=b'x', named='-', mapping={})"
    given = {"a": "b"}
    assert Sample(1, b"x", "n", given).mapping is given


def test_a_default_factory_makes_a_new_value_for_each_record():
    assert Sample(1, b"").mapping is not Sample(1, b"").mapping
    # An explicit None is stored, not replaced by the factory's value.
    assert Sample(1, b"", mapping=None).mapping is None  # type: ignore[arg-type]


def test_is_frozen_comparable_and_replaceable():
    record = Sample(1, b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.first = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del record.named
    assert record == Sample(1, b"x")
    assert record != Sample(2, b"x")
    changed = dataclasses.replace(record, named="n")
    assert (changed.first, changed.named) == (1, "n")
    assert [field.name for field in dataclasses.fields(Sample)] == [
        "first", "second", "named", "mapping", "hidden",
    ]


def test_refuses_what_it_cannot_build():
    with pytest.raises(TypeError):

        @frozen_record
        class Checked:
            value: int

            def __post_init__(self) -> None:
                pass


# A record longer than a one-instruction dict display (its display is built
# one item at a time).
_LONG_FIELDS = [(f"f{index}", int, index) for index in range(18)]
_LONG_FIELDS[3] = ("f3", dict, dataclasses.field(default_factory=dict))
_LONG_FIELDS[17] = ("f17", list, dataclasses.field(default_factory=list))
LongSample = frozen_record(
    type(
        "LongSample",
        (),
        {
            "__annotations__": {name: kind for name, kind, _ in _LONG_FIELDS},
            **{name: default for name, _, default in _LONG_FIELDS},
        },
    )
)
LongReference = dataclasses.make_dataclass("LongSample", _LONG_FIELDS, frozen=True)


@pytest.mark.parametrize(
    "arguments",
    [{}, {"f0": "a", "f3": {"k": "v"}, "f16": None}, {"f17": [1], "f3": None, "f9": b"x"}],
)
def test_a_long_record_stores_what_a_frozen_dataclass_stores(arguments):
    record, reference = LongSample(**arguments), LongReference(**arguments)
    assert vars(record) == vars(reference)
    assert list(vars(record)) == list(vars(reference))
    assert repr(record) == repr(reference)
    assert LongSample().f3 is not LongSample().f3
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.f1 = 2


@pytest.mark.parametrize(
    "arguments",
    [((1, b"x"), {}), ((1, b"x", "n"), {"hidden": b"h"}), ((2, b""), {"mapping": None})],
)
def test_its_maker_builds_what_its_class_builds(arguments):
    """maker(cls) takes the class's arguments and builds an equal record, without __init__."""
    from quayfront.http._record import maker

    positional, keywords = arguments
    made, built = maker(Sample)(*positional, **keywords), Sample(*positional, **keywords)
    assert type(made) is Sample
    assert made == built and vars(made) == vars(built) and list(vars(made)) == list(vars(built))
    assert repr(made) == repr(built)
    assert maker(Sample)(1, b"").mapping is not maker(Sample)(1, b"").mapping
    with pytest.raises(TypeError):
        maker(Sample)(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.first = 2
    long_made = maker(LongSample)(f0="a", f3=None)
    assert vars(long_made) == vars(LongReference(f0="a", f3=None))
