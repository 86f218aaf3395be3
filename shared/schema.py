"""Checked tables: how relayd.toml and relayc.toml are validated, in a few lines of our own code.

A ``Table`` is a dataclass whose fields say what each key of a TOML table may hold: the type comes
from the annotation (``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``list[...]``,
another ``Table``, ``Table | None``), bounds and checks from ``key(...)``.  ``Table.from_table``
builds one from parsed TOML and collects every problem as (key path, reason): unknown keys,
missing keys, wrong types, values out of bounds, and whatever a check function raises as
``ValueError``.

Why not pydantic, which did this job before: relayc's idle memory budget is 30 MiB, and importing
pydantic and building the config schemas cost about 10 MiB of it (measured with
``/proc/self/status`` around the import; see docs/architecture.md).  What the configs need is small
and is all here.  The dashboard's API bodies still use pydantic through FastAPI, in relayd only.

The control messages (``shared.messages``) keep their own, smaller checker on purpose: a peer's
message may carry fields a newer version added (ignored there, an error here), every string has a
length limit against a hostile peer, and one ``stream_open`` is decoded per visitor connection, so
that path is kept to a loop over cached field specs.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

TableT = TypeVar("TableT", bound="Table")
Loc = tuple[int | str, ...]


class SchemaError(Exception):
    """One or more problems in a table, each as (key path, reason), in file order."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(f"{key_path(loc)}: {why}" for loc, why in problems))
        self.problems = problems


class ShapeProblem(tuple):  # type: ignore[type-arg]
    """A problem (key path, reason) with a value's shape: a missing key, a wrong type, a number or
    length out of bounds; as opposed to a value a check function refused.  A wire decoder treats
    these as protocol errors."""

    __slots__ = ()


def _shape(loc: Loc, reason: str) -> tuple[Loc, str]:
    return ShapeProblem((loc, reason))  # type: ignore[return-value]


class _Rule:
    __slots__ = ("before", "check", "ge", "gt", "le", "max_len")

    def __init__(
        self,
        ge: float | None,
        gt: float | None,
        le: float | None,
        before: Callable[[Any], Any] | None,
        check: Callable[[Any], Any] | None,
        max_len: int | None = None,
    ) -> None:
        self.ge, self.gt, self.le, self.before, self.check = ge, gt, le, before, check
        self.max_len = max_len


_NO_RULE = _Rule(None, None, None, None, None)


def key(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    before: Callable[[Any], Any] | None = None,
    check: Callable[[Any], Any] | None = None,
    max_len: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Any:
    """Declare one key: its default (none = required), bounds (``max_len``: characters of a string,
    items of a list), a converter run on the raw value (``before``), a check run on the typed
    value that returns it, normalized (``check``), and what else a model wants to say about the
    key (``meta``, read back with ``Table.key_meta``)."""
    meta = {"rule": _Rule(ge, gt, le, before, check, max_len), **(meta or {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, list):
        items = tuple(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


def key_path(loc: Loc) -> str:
    """``('tunnels', 1, 'local_port')`` -> ``tunnels[1].local_port``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


class _Invalid:
    """Marks a value that failed; its problem is already recorded."""


_INVALID = _Invalid()


class Table:
    """Base of the config tables (subclasses are ``@dataclass(kw_only=True)``)."""

    _schema: ClassVar[tuple[tuple[str, Any, _Rule, Field[Any]], ...]]

    @classmethod
    def schema(cls) -> tuple[tuple[str, Any, _Rule, Field[Any]], ...]:
        """(key, resolved type, rule, dataclass field) per key; resolved once per class."""
        cached = cls.__dict__.get("_schema")
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = tuple(
                (f.name, hints[f.name], f.metadata.get("rule") or _NO_RULE, f)
                for f in fields(cls)  # type: ignore[arg-type]
            )
            cls._schema = cached
        return cached

    @classmethod
    def key_meta(cls, name: str) -> dict[str, Any]:
        """What ``key(meta=...)`` declared for one key (empty if nothing)."""
        for key_name, _, _, f in cls.schema():
            if key_name == name:
                return {k: v for k, v in f.metadata.items() if k != "rule"}
        raise KeyError(name)

    @classmethod
    def table_keys(cls) -> dict[str, type[Table] | None]:
        """Every key, with its sub-table class when it holds one (for docs and tests)."""
        out: dict[str, type[Table] | None] = {}
        for name, tp, _, _ in cls.schema():
            inner = [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
            out[name] = inner[0] if isinstance(inner[0], type) and issubclass(inner[0], Table) else None
        return out

    @classmethod
    def from_table(cls: type[TableT], data: Any) -> TableT:
        problems: list[tuple[Loc, str]] = []
        value = _table(cls, data, (), problems)
        if problems:
            raise SchemaError(problems)
        assert isinstance(value, cls)
        return value


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _describe(value: Any) -> str:
    """A value as the user wrote it in TOML (``true``, not ``True``), cut short."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(reason: str, value: Any) -> str:
    """``reason (got value)``, unless the reason already quotes the (string) value."""
    shown = _describe(value)
    return reason if isinstance(value, str) and shown in reason else f"{reason} (got {shown})"


def _table(cls: type[Table], data: Any, loc: Loc, problems: list[tuple[Loc, str]]) -> Table | _Invalid:
    if not isinstance(data, dict):
        problems.append(_shape(loc, _problem("expected a table", data)))
        return _INVALID
    schema = cls.schema()
    known = {name for name, _, _, _ in schema}
    for name in data:
        if name not in known:
            problems.append(((*loc, name), "unknown key (is it misspelled?)"))
    values: dict[str, Any] = {}
    for name, tp, rule, f in schema:
        here = (*loc, name)
        if name in data:
            raw = data[name]
        elif isinstance(tp, type) and issubclass(tp, Table):
            raw = {}  # a table left out is the table with its defaults
        elif f.default is not MISSING:
            raw = f.default
            if raw is None:
                values[name] = None
                continue
        elif f.default_factory is not MISSING:
            raw = f.default_factory()
        else:
            problems.append(_shape(here, "required key is missing"))
            continue
        value = _value(tp, rule, raw, here, problems)
        if value is not _INVALID:
            values[name] = value
    if len(values) != len(schema):
        return _INVALID
    return cls(**values)


def _value(tp: Any, rule: _Rule, raw: Any, loc: Loc, problems: list[tuple[Loc, str]]) -> Any:
    try:
        if rule.before is not None:
            raw = rule.before(raw)
        value = _typed(tp, raw, loc, problems)
        if value is _INVALID:
            return value
        bound = _out_of_bounds(rule, value)
        if bound:
            problems.append(_shape(loc, _problem(bound, raw)))
            return _INVALID
        return value if rule.check is None else rule.check(value)
    except (ValueError, TypeError, OverflowError) as exc:  # checks see peers' values: none may escape
        problems.append((loc, _problem(str(exc)[:200], raw)))
        return _INVALID


def _out_of_bounds(rule: _Rule, value: Any) -> str:
    if rule.ge is not None and value < rule.ge:
        return f"must be at least {rule.ge:g}"
    if rule.gt is not None and value <= rule.gt:
        return f"must be greater than {rule.gt:g}"
    if rule.le is not None and value > rule.le:
        return f"must be at most {rule.le:g}"
    if rule.max_len is not None and len(value) > rule.max_len:
        unit = "items" if isinstance(value, list) else "characters"
        return f"must hold at most {rule.max_len} {unit}"
    return ""


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(tp: Any, raw: Any, loc: Loc, problems: list[tuple[Loc, str]]) -> Any:
    if isinstance(tp, type) and issubclass(tp, Table):
        return _table(tp, raw, loc, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if raw == member.value and isinstance(raw, str):
                return member
        names = ", ".join(repr(m.value) for m in tp)
        problems.append((loc, _problem(f"must be one of {names}", raw)))
        return _INVALID
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if raw in choices and isinstance(raw, str):
            return raw
        problems.append((loc, _problem(f"must be one of {', '.join(repr(c) for c in choices)}", raw)))
        return _INVALID
    if origin is list:
        if not isinstance(raw, list):
            problems.append(_shape(loc, _problem("expected a list", raw)))
            return _INVALID
        (item_type,) = get_args(tp)
        items = [_typed(item_type, item, (*loc, i), problems) for i, item in enumerate(raw)]
        return _INVALID if any(item is _INVALID for item in items) else items
    if _is_union(tp):
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return _typed(inner, raw, loc, problems)
    ok = (
        isinstance(raw, bool)
        if tp is bool
        else isinstance(raw, (int, float)) and not isinstance(raw, bool)
        if tp is float
        else isinstance(raw, tp) and not (tp is int and isinstance(raw, bool))
    )
    if not ok:
        problems.append(_shape(loc, _problem(f"expected {_TYPE_NAMES.get(tp, tp.__name__)}", raw)))
        return _INVALID
    return float(raw) if tp is float else raw
