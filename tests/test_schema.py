"""shared.schema: the checked tables behind relayd.toml and relayc.toml, with plain dicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pytest

from shared.schema import SchemaError, Table, key, key_path


def _even(v: int) -> int:
    if v % 2:
        raise ValueError("must be even")
    return v


def _parse_size(v: Any) -> int:
    if isinstance(v, str):
        if not v.endswith("k") or not v[:-1].isdigit():
            raise ValueError(f"{v!r} is not a size like 4k")
        return int(v[:-1]) * 1000
    return int(v)


@dataclass(kw_only=True)
class Inner(Table):
    port: int = key(80, ge=1, le=65535)
    tags: list[str] = key(["a"])


@dataclass(kw_only=True)
class Item(Table):
    name: str = key()
    kind: Literal["tcp", "http"] = key("tcp")


@dataclass(kw_only=True)
class Outer(Table):
    ratio: float = key(1.0, gt=0)
    count: int = key(2, check=_even)
    size: int = key(0, before=_parse_size)
    flag: bool = key(False)
    inner: Inner = key(factory=Inner)
    maybe: Inner | None = key(None)
    items: list[Item] = key([])


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(SchemaError) as info:
        Outer.from_table(data)
    return [(key_path(loc), why) for loc, why in info.value.problems]


def test_defaults_fill_every_key_and_lists_are_not_shared() -> None:
    a, b = Outer.from_table({}), Outer.from_table({})
    assert (a.ratio, a.count, a.size, a.flag, a.inner.port, a.maybe, a.items) == (1.0, 2, 0, False, 80, None, [])
    a.inner.tags.append("b")
    assert b.inner.tags == ["a"]


def test_values_are_converted_and_checked() -> None:
    o = Outer.from_table(
        {"ratio": 3, "count": 4, "size": "4k", "maybe": {"port": 8080}, "items": [{"name": "x", "kind": "http"}]}
    )
    assert o.ratio == 3.0 and isinstance(o.ratio, float)
    assert o.size == 4000 and o.count == 4
    assert o.maybe is not None and o.maybe.port == 8080
    assert o.items[0] == Item(name="x", kind="http")


@pytest.mark.parametrize(
    "data,where,why",
    [
        ({"ratoi": 1}, "ratoi", "unknown key (is it misspelled?)"),
        ({"inner": {"prot": 1}}, "inner.prot", "unknown key"),
        ({"ratio": "1"}, "ratio", "expected a number (got '1')"),
        ({"ratio": True}, "ratio", "expected a number (got true)"),
        ({"count": 2.0}, "count", "expected an integer (got 2.0)"),
        ({"flag": 1}, "flag", "expected true or false (got 1)"),
        ({"ratio": 0}, "ratio", "must be greater than 0 (got 0)"),
        ({"inner": {"port": 0}}, "inner.port", "must be at least 1 (got 0)"),
        ({"inner": {"port": 65536}}, "inner.port", "must be at most 65535 (got 65536)"),
        ({"count": 3}, "count", "must be even (got 3)"),
        ({"size": "4 parsecs"}, "size", "'4 parsecs' is not a size like 4k"),
        ({"inner": 3}, "inner", "expected a table (got 3)"),
        ({"items": {"name": "x"}}, "items", "expected a list"),
        ({"items": [{"kind": "tcp"}]}, "items[0].name", "required key is missing"),
        ({"items": [{"name": "a"}, {"name": "b", "kind": "udp"}]}, "items[1].kind", "must be one of 'tcp', 'http'"),
        ({"inner": {"tags": ["a", 3]}}, "inner.tags[1]", "expected a string (got 3)"),
    ],
)
def test_each_problem_names_its_key(data: dict[str, Any], where: str, why: str) -> None:
    found = problems(data)
    assert found[0][0] == where
    assert why in found[0][1]


def test_every_problem_is_reported_once() -> None:
    found = problems({"ratio": 0, "count": 3, "bogus": 1, "items": [{"name": 1}]})
    assert sorted(w for w, _ in found) == ["bogus", "count", "items[0].name", "ratio"]


def test_table_keys_lists_sub_tables() -> None:
    keys = Outer.table_keys()
    assert keys["inner"] is Inner and keys["maybe"] is Inner and keys["ratio"] is None and keys["items"] is None
    assert set(Inner.table_keys()) == {"port", "tags"}
