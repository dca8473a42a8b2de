"""Typed benchmark records: what a benchmark returns, writes as JSON and the report reads.

A benchmark's module defines its record as a frozen dataclass deriving :class:`BenchRecord`
(fields typed with dataclasses, ``tuple[X, ...]``, ``dict[str, X]``, ``X | None`` and
JSON scalars) and a ``render_section(record) -> list[str]`` next to it; the report is
generic over them. :func:`to_json` / :func:`from_json` convert both ways, so a record read
back from ``<name>.json`` is the same typed object that was written::

    @dataclass(frozen=True, slots=True)
    class Row:
        agents: int
        total_s: float

    @dataclass(frozen=True, slots=True)
    class WorkloadRecord(BenchRecord):
        rows: tuple[Row, ...]

    from_json(WorkloadRecord, to_json(WorkloadRecord((Row(4, 1.5),)), ...)) == the record

Records round floats where they are made (``measure.ratio`` and friends); JSON keeps what
they hold.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kvpool.errors import KvpoolError

T = TypeVar("T")
R = TypeVar("R", bound="BenchRecord")


class RecordError(KvpoolError, ValueError):
    """A JSON record does not have the shape of its record type."""


@dataclass(frozen=True, slots=True)
class Target:
    """One target of a benchmark: ``met`` None = not judged (the measurement is missing)."""

    name: str
    target: str
    value: float | str | None
    met: bool | None


@dataclass(frozen=True, slots=True)
class BenchRecord:
    """Base of every benchmark's typed record: the targets it judged."""

    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class Section(Generic[R]):
    """How the report shows a benchmark: its record type, the markdown of its section, and
    (optional) a plot drawn into a matplotlib figure. Each typed benchmark module defines
    ``SECTION = Section(TheRecord, render_section, plot)``."""

    record: type[R]
    render: Callable[[R], list[str]]
    plot: Callable[[Any, R], None] | None = None

    def read(self, data: Mapping[str, Any]) -> R:
        return from_json(self.record, data)


@dataclass(frozen=True, slots=True)
class Blas:
    blas: str
    openblas_threads: int | None = None


@dataclass(frozen=True, slots=True)
class Environment:
    """Where a record was measured (``kvpool.benchmarks.environment.describe``)."""

    kvpool: str | None
    mlx: str | None
    mlx_lm: str | None
    python: str
    machine: str
    processor: str
    cpu_count: int | None
    load_average: tuple[float, ...]
    blas: Blas


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the runner adds to every record, typed or not: name, mode, timing, where."""

    bench: str
    quick: bool
    started: str
    elapsed_s: float
    error: str | None
    environment: Environment
    targets: tuple[Target, ...] = ()


def to_json(record: object) -> Any:
    """``record`` (a dataclass, or containers of them) as JSON-ready values."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, list | tuple):
        return [to_json(v) for v in record]
    if isinstance(record, Mapping):
        return {str(k): to_json(v) for k, v in record.items()}
    return record


def from_json(cls: type[T], data: Any) -> T:
    """The ``cls`` record that :func:`to_json` wrote as ``data``; RecordError if a field
    is missing or holds a value of another type."""
    return typing.cast(T, _convert(cls, data, cls.__name__))


def _convert(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, data, where)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(f"{where}: {data!r} fits none of {options} ({'; '.join(errors)})")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, list | tuple):
            raise RecordError(f"{where}: expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise RecordError(f"{where}: expected {len(args)} items, got {len(data)}")
        pairs = enumerate(zip(args, data, strict=True))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        return {k: _convert(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        values = {}
        for f in dataclasses.fields(tp):
            if f.name not in data:
                if f.default is not dataclasses.MISSING:
                    continue
                raise RecordError(f"{where}: field {f.name!r} missing")
            values[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
        return tp(**values)
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise RecordError(f"{where}: expected a number, got {data!r}")
        return float(data)
    if tp in (int, str, bool):
        if type(data) is not tp:
            raise RecordError(f"{where}: expected {tp.__name__}, got {data!r}")
        return data
    raise RecordError(f"{where}: records cannot hold {tp!r}")
