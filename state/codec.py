"""Columnar values for LMDB: a column dict encoded as one byte string.

Layout: ``uint32`` row count (little endian), then each column's raw little-endian bytes in the
order of the schema (a ``dict[str, numpy.dtype]``).  Decoding is zero-copy ``numpy.frombuffer``.
The schema is fixed per sub-database (see docs/state.md), so no names are stored per value.
"""

from __future__ import annotations

import struct

import numpy as np

from streamstars.columns import ColumnDict

_COUNT = struct.Struct("<I")


def encode_columns(columns: ColumnDict, schema: dict[str, np.dtype]) -> bytes:
    """Encode ``columns`` (all of equal length) in the order and dtypes of ``schema``."""
    n = len(next(iter(columns.values()))) if columns else 0
    parts = [_COUNT.pack(n)]
    for name, dtype in schema.items():
        values = np.ascontiguousarray(columns[name], dtype=dtype.newbyteorder("<"))
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} rows, expected {n}")
        parts.append(values.tobytes())
    return b"".join(parts)


def decode_columns(buffer: bytes, schema: dict[str, np.dtype],
                   only: frozenset[str] | None = None) -> ColumnDict:
    """Decode a value written by :func:`encode_columns` with the same ``schema``.

    ``only`` restricts the result to these columns (the others are skipped, not decoded).
    """
    (n,) = _COUNT.unpack_from(buffer, 0)
    offset = _COUNT.size
    out: ColumnDict = {}
    for name, dtype in schema.items():
        le = dtype.newbyteorder("<")
        if only is None or name in only:
            out[name] = np.frombuffer(buffer, dtype=le, count=n, offset=offset)
        offset += n * le.itemsize
    if offset != len(buffer):
        raise ValueError(f"columnar value has {len(buffer)} bytes, schema needs {offset}")
    return out


class ColumnReader:
    """Reads single columns of values encoded with one ``schema`` (offsets precomputed):
    the cheap path for scanning many values for one column."""

    def __init__(self, schema: dict[str, np.dtype]) -> None:
        self._dtypes = {name: dt.newbyteorder("<") for name, dt in schema.items()}
        self._before: dict[str, int] = {}
        size = 0
        for name, dt in self._dtypes.items():
            self._before[name] = size
            size += dt.itemsize
        self._row_size = size

    def rows(self, buffer: bytes) -> int:
        """Row count of a value (checked against its length)."""
        (n,) = _COUNT.unpack_from(buffer, 0)
        if len(buffer) != _COUNT.size + n * self._row_size:
            raise ValueError(f"columnar value has {len(buffer)} bytes, schema needs "
                             f"{_COUNT.size + n * self._row_size}")
        return int(n)

    def column(self, buffer: bytes, name: str, n: int) -> np.ndarray:
        """Zero-copy view of column ``name`` of a value of ``n`` rows."""
        return np.frombuffer(buffer, dtype=self._dtypes[name], count=n,
                             offset=_COUNT.size + n * self._before[name])
