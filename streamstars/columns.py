"""Column contracts shared by the readers, the store and the snapshot writers.

A *column dict* (``dict[str, numpy.ndarray]``, all arrays of one length) is how tables travel
between modules: columnar from parquet to LMDB to the snapshot files.
"""

from __future__ import annotations

import numpy as np

#: One selected observation of a visit, as produced by
#: :func:`streamstars.select.select_observations` and stored per (band, pixel, visit).
#: Angles in degrees, magnitudes in mag, x/y in pixels.
OBSERVATION_DTYPES: dict[str, np.dtype] = {
    "source_id": np.dtype(np.int64),
    "visit": np.dtype(np.int64),
    "detector": np.dtype(np.int32),
    "ra": np.dtype(np.float64),
    "dec": np.dtype(np.float64),
    "x": np.dtype(np.float64),
    "y": np.dtype(np.float64),
    "psf_candidate": np.dtype(np.bool_),
    "inst_mag": np.dtype(np.float64),
    "inst_mag_err": np.dtype(np.float64),
    "jacobian": np.dtype(np.float64),
    "delta_mag_bkg": np.dtype(np.float64),
    "delta_mag_aper": np.dtype(np.float64),
    "delta_mag_err_aper": np.dtype(np.float64),
}

ColumnDict = dict[str, np.ndarray]


def empty_columns(dtypes: dict[str, np.dtype]) -> ColumnDict:
    """A zero-length column dict with the given dtypes."""
    return {name: np.zeros(0, dtype=dt) for name, dt in dtypes.items()}


def take(columns: ColumnDict, index: np.ndarray) -> ColumnDict:
    """Rows ``index`` (integer array or boolean mask) of every column."""
    return {name: values[index] for name, values in columns.items()}


def concat(parts: list[ColumnDict], dtypes: dict[str, np.dtype]) -> ColumnDict:
    """Concatenate column dicts (an empty list gives zero-length columns)."""
    if not parts:
        return empty_columns(dtypes)
    return {name: np.concatenate([p[name] for p in parts]).astype(dt, copy=False)
            for name, dt in dtypes.items()}

