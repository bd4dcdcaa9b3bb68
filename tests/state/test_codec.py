"""The columnar value codec of the LMDB store."""

from __future__ import annotations

import numpy as np
import pytest

from streamstars.state.codec import ColumnReader, decode_columns, encode_columns

SCHEMA = {"a": np.dtype(np.int64), "flag": np.dtype(np.bool_), "x": np.dtype(np.float32),
          "b": np.dtype(np.int32)}


def _table(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {"a": rng.integers(-2**62, 2**62, n), "flag": rng.random(n) < 0.5,
            "x": rng.random(n).astype(np.float32), "b": rng.integers(-9, 9, n).astype(np.int32)}


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_round_trip_and_single_columns(n: int) -> None:
    table = _table(n)
    value = encode_columns(table, SCHEMA)
    decoded = decode_columns(value, SCHEMA)
    only = decode_columns(value, SCHEMA, frozenset({"x"}))
    reader = ColumnReader(SCHEMA)
    assert reader.rows(value) == n and list(only) == ["x"]
    for name in SCHEMA:
        np.testing.assert_array_equal(decoded[name], table[name])
        np.testing.assert_array_equal(reader.column(memoryview(value), name, n), table[name])


def test_values_of_the_wrong_length_are_refused() -> None:
    value = encode_columns(_table(5), SCHEMA)
    with pytest.raises(ValueError, match="bytes"):
        ColumnReader(SCHEMA).rows(value[:-1])
    with pytest.raises(ValueError, match="bytes"):
        decode_columns(value + b"\0", SCHEMA)
    with pytest.raises(ValueError, match="rows"):
        encode_columns({**_table(5), "b": np.zeros(4, np.int32)}, SCHEMA)
