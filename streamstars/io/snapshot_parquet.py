"""The production parquet files of a snapshot.

``fgcm_star_observations.parquet``, ``fgcm_star_ids.parquet``, ``fgcmVisitCatalog.parquet``
and ``fgcm_reference_stars.parquet`` (schema metadata ``FILTERNAMES``), zstd-compressed.  The
provenance JSON is stored under the schema-metadata key ``streamstars``.

The column specifications here are shared with the HATS catalog (:mod:`streamstars.io.hats`)
and the streamed writer (:mod:`streamstars.io.flat_stream`), which writes the same files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamstars.columns import OBSERVATION_DTYPES
from streamstars.io.snapshot_catalogs import (
    PARQUET_FILES,
    REFSTARS_FORMAT_VERSION,
    STAR_DTYPES,
    VISIT_ARRAY_FIELDS,
    VISIT_ORDER,
    VISIT_SCALAR_DTYPES,
    SnapshotCatalogs,
    compare_provenance,
    provenance_json,
)

__all__ = [
    "PARQUET_COMPRESSION",
    "PARQUET_META_KEY",
    "PARQUET_OBS_COLUMNS",
    "PARQUET_STAR_COLUMNS",
    "compare_parquet",
    "fixed_list",
    "ipc_bytes",
    "parquet_observation_arrays",
    "parquet_reference_columns",
    "parquet_schema",
    "read_parquet_catalogs",
    "reference_parquet_metadata",
    "write_parquet_files",
    "write_visit_parquet",
]

#: Schema-metadata key of the provenance JSON.
PARQUET_META_KEY = b"streamstars"
PARQUET_COMPRESSION = "zstd"

#: (name, arrow type) of fgcm_star_observations, in file order.
PARQUET_OBS_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("x", pa.float32()),
    ("y", pa.float32()),
    ("visit", pa.int64()),
    ("detector", pa.int32()),
    ("inst_mag", pa.float32()),
    ("inst_mag_err", pa.float32()),
    ("jacobian", pa.float32()),
    ("delta_mag_bkg", pa.float32()),
    ("delta_mag_aper", pa.float32()),
    ("delta_mag_err_aper", pa.float32()),
    ("psf_candidate", pa.bool_()),
    ("source_id", pa.int64()),
)
#: (name, arrow type) of fgcm_star_ids: the star columns in their in-memory types.
PARQUET_STAR_COLUMNS: tuple[tuple[str, pa.DataType], ...] = tuple(
    (name, pa.from_numpy_dtype(dtype)) for name, dtype in STAR_DTYPES.items())


def parquet_reference_columns(nfilt: int) -> tuple[tuple[str, pa.DataType], ...]:
    """(name, arrow type) of fgcm_reference_stars."""
    return (("fgcm_id", pa.int64()), ("refMag", pa.list_(pa.float32(), nfilt)),
            ("refMagErr", pa.list_(pa.float32(), nfilt)))


def reference_parquet_metadata(filters: Sequence[str]) -> dict[str, str]:
    """Schema metadata of fgcm_reference_stars: the filter order and the format version."""
    return {"FILTERNAMES": ",".join(filters),
            "REFSTARS_FORMAT_VERSION": str(REFSTARS_FORMAT_VERSION)}


def fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """A fixed-size list column of ``value_type`` from an (n, size) array."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, int(values.shape[1]))


def parquet_schema(columns: Sequence[tuple[str, pa.DataType]], metadata: dict[str, str],
                   extra: dict[str, str] | None = None) -> pa.Schema:
    """Schema of a production parquet file: the columns, provenance and ``extra`` metadata."""
    meta = {PARQUET_META_KEY: provenance_json(metadata).encode()}
    for key, value in (extra or {}).items():
        meta[key.encode()] = value.encode()
    return pa.schema([pa.field(name, typ) for name, typ in columns], metadata=meta)


def parquet_observation_arrays(o: dict[str, np.ndarray]) -> list[pa.Array]:
    """fgcm_star_observations arrays, cast to their production types (numpy casts)."""
    return [pa.array(np.asarray(o[name]).astype(typ.to_pandas_dtype(), copy=False), type=typ)
            for name, typ in PARQUET_OBS_COLUMNS]


def _write_parquet(path: Path, arrays: list[pa.Array], names: list[str],
                   metadata: dict[str, str], extra: dict[str, str] | None = None) -> None:
    table = pa.Table.from_arrays(arrays, names=names)
    schema = parquet_schema([(f.name, f.type) for f in table.schema], metadata, extra)
    pq.write_table(table.replace_schema_metadata(schema.metadata), path,
                   compression=PARQUET_COMPRESSION)


def write_visit_parquet(out: Path, v: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """Write ``out/fgcmVisitCatalog.parquet`` from normalised visit columns.

    Returns:
        Its row count.
    """
    arrays: list[pa.Array] = []
    for name in VISIT_ORDER:
        if name in VISIT_ARRAY_FIELDS:
            arrays.append(fixed_list(v[name], pa.float64()))
        elif name == "physicalFilter":
            arrays.append(pa.array(v[name].tolist(), type=pa.string()))
        else:
            arrays.append(pa.array(v[name]))
    _write_parquet(out / PARQUET_FILES["visits"], arrays, list(VISIT_ORDER), meta)
    return len(v["visit"])


def write_parquet_files(out: Path, cat: SnapshotCatalogs) -> dict[str, int]:
    """Write the production parquet files of normalised catalogs into the directory ``out``.

    Returns:
        Rows written per file name.
    """
    rows: dict[str, int] = {}
    meta = cat.metadata
    rows[PARQUET_FILES["visits"]] = write_visit_parquet(out, cat.visits, meta)

    o = cat.observations
    _write_parquet(out / PARQUET_FILES["observations"], parquet_observation_arrays(o),
                   [name for name, _ in PARQUET_OBS_COLUMNS], meta)
    rows[PARQUET_FILES["observations"]] = len(o["visit"])

    s = cat.stars
    _write_parquet(out / PARQUET_FILES["stars"],
                   [pa.array(s[name], type=typ) for name, typ in PARQUET_STAR_COLUMNS],
                   [name for name, _ in PARQUET_STAR_COLUMNS], meta)
    rows[PARQUET_FILES["stars"]] = len(s["fgcm_id"])

    if cat.reference is not None:
        r = cat.reference
        _write_parquet(out / PARQUET_FILES["reference"],
                       [pa.array(r["fgcm_id"], type=pa.int64()),
                        fixed_list(r["refMag"], pa.float32()),
                        fixed_list(r["refMagErr"], pa.float32())],
                       [name for name, _ in
                        parquet_reference_columns(len(cat.reference_filters))], meta,
                       reference_parquet_metadata(cat.reference_filters))
        rows[PARQUET_FILES["reference"]] = len(r["fgcm_id"])
    return rows


def _fixed_list_to_numpy(column: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    array = column.combine_chunks()
    size = array.type.list_size
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False),
                      dtype=dtype).reshape(-1, size)


def _parquet_provenance(schema: pa.Schema) -> dict[str, str]:
    raw = (schema.metadata or {}).get(PARQUET_META_KEY)
    return dict(json.loads(raw)) if raw else {}


def read_parquet_catalogs(handles: dict[str, IO[bytes]]) -> SnapshotCatalogs:
    """The catalogs of the parquet files open in ``handles`` (file name -> binary handle).

    x, y and the magnitudes come back float32-rounded (the files store them as float32).
    """
    visits_table = pq.read_table(handles[PARQUET_FILES["visits"]])
    visits: dict[str, np.ndarray] = {}
    for name in VISIT_ORDER:
        if name in VISIT_ARRAY_FIELDS:
            visits[name] = _fixed_list_to_numpy(visits_table[name], np.dtype(np.float64))
        elif name == "physicalFilter":
            visits[name] = np.asarray(visits_table[name].to_pylist(), dtype=np.str_)
        else:
            visits[name] = np.asarray(visits_table[name].to_numpy(),
                                      dtype=VISIT_SCALAR_DTYPES[name])
    obs_table = pq.read_table(handles[PARQUET_FILES["observations"]])
    observations = {name: np.asarray(obs_table[name].to_numpy(), dtype=dt)
                    for name, dt in OBSERVATION_DTYPES.items()}
    star_table = pq.read_table(handles[PARQUET_FILES["stars"]])
    stars = {name: np.asarray(star_table[name].to_numpy(), dtype=dt)
             for name, dt in STAR_DTYPES.items()}
    reference = None
    filters: tuple[str, ...] = ()
    ref_handle = handles.get(PARQUET_FILES["reference"])
    if ref_handle is not None:
        ref_table = pq.read_table(ref_handle)
        reference = {
            "fgcm_id": np.asarray(ref_table["fgcm_id"].to_numpy(), dtype=np.int64),
            "refMag": _fixed_list_to_numpy(ref_table["refMag"], np.dtype(np.float32)),
            "refMagErr": _fixed_list_to_numpy(ref_table["refMagErr"], np.dtype(np.float32)),
        }
        names = (ref_table.schema.metadata or {}).get(b"FILTERNAMES", b"").decode()
        filters = tuple(names.split(",")) if names else ()
    return SnapshotCatalogs(visits=visits, observations=observations, stars=stars,
                            reference=reference, reference_filters=filters,
                            metadata=_parquet_provenance(star_table.schema))


def ipc_bytes(table: pa.Table) -> bytes:
    """The Arrow IPC stream of ``table``: equal bytes mean bitwise-equal columns."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def compare_parquet(fname: str, a: Path, b: Path, ignore: Sequence[str]) -> list[str]:
    """Differences between two parquet files of the same name (empty list: identical).

    The provenance less the keys in ``ignore``, the other schema metadata, the schema and
    every column bitwise.
    """
    ta, tb = pq.read_table(a), pq.read_table(b)
    meta_a, meta_b = dict(ta.schema.metadata or {}), dict(tb.schema.metadata or {})
    diffs = compare_provenance(fname, json.loads(meta_a.pop(PARQUET_META_KEY, b"{}")),
                               json.loads(meta_b.pop(PARQUET_META_KEY, b"{}")), ignore)
    if meta_a != meta_b:
        keys = sorted(k.decode() for k in set(meta_a) ^ set(meta_b)
                      | {k for k in meta_a if meta_b.get(k) != meta_a[k]})
        diffs.append(f"{fname}: schema metadata differs ({', '.join(keys)})")
    ta, tb = ta.replace_schema_metadata(None), tb.replace_schema_metadata(None)
    if ta.schema != tb.schema:
        diffs.append(f"{fname}: schema differs: {ta.schema} != {tb.schema}")
        return diffs
    if ta.num_rows != tb.num_rows:
        diffs.append(f"{fname}: {ta.num_rows} rows != {tb.num_rows} rows")
        return diffs
    for col in ta.column_names:
        ca = pa.table({col: ta[col].combine_chunks()})
        cb = pa.table({col: tb[col].combine_chunks()})
        if ipc_bytes(ca) != ipc_bytes(cb):
            diffs.append(f"{fname}: column {col!r} differs")
    return diffs
