"""Read ``sourceTable_visit`` parquet files into a table with canonical modern column names.

Only the columns the configuration needs are read (parquet column projection).  The returned
:class:`pyarrow.Table` uses the *canonical* names: ``sourceId``, ``visit``, ``detector``,
``ra``, ``dec``, ``x``, ``y``, every flux/flag/selector column under the name the configuration
gives it (``apFlux_12_0_instFlux``, ``pixelFlags_edge`` ...), ``physical_filter`` and ``band``
when present, and ``localWcs_CDMatrix_{1_1,1_2,2_1,2_2}`` when present and
``doApplyWcsJacobian`` is on.

Older layouts are mapped onto these names:

* ``decl`` for ``dec`` (before 2023), ``ccd`` for ``detector``, ``filter`` for
  ``physical_filter``;
* gen2-era capitalised names (``ApFlux_12_0_instFlux``, ``PixelFlags_edge``,
  ``Centroid_flag``, ``Calib_psf_candidate``, ``Deblend_nChild``, ``LocalBackground_instFlux``,
  ``LocalWcs_CDMatrix_1_1`` ...): a configured name matches a file column that differs only in
  the case of its first letter, and, failing that, one that differs only in case;
* ``sourceId`` stored as the pandas index (``index_columns`` of the ``pandas`` schema metadata)
  or as ``id``;
* float32 or float64 (always returned as float64; integers as int64; strings as ``string``);
* no ``detect_isPrimary`` column (the column is then simply absent and the cut is skipped).

Null values are kept as nulls (the selector treats a null flag as set, a null number as NaN).

Errors name the file, the visit when it is known, and the cause: :class:`InputFileError` for a
missing / truncated / non-parquet file or a missing column (with near matches);
:class:`InvalidSourceTableError` for a wrong column type, zero rows ("empty visit"), duplicate
or null ``sourceId``, more than one visit in a file ("mixed visits"), or a visit other than the
one expected.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import BuildStarsConfig
from ..errors import InputFileError, InvalidSourceTableError, SourceFileMissingError

Kind = Literal["float", "int", "bool", "str"]

#: Canonical names of the WCS CD-matrix columns (radians or degrees per pixel; only ratios of
#: their determinants are used).
CD_MATRIX_COLUMNS: tuple[str, ...] = (
    "localWcs_CDMatrix_1_1",
    "localWcs_CDMatrix_1_2",
    "localWcs_CDMatrix_2_1",
    "localWcs_CDMatrix_2_2",
)

#: Explicit aliases: canonical name -> older names tried after the canonical one.
ALIASES: dict[str, tuple[str, ...]] = {
    "dec": ("decl",),
    "detector": ("ccd",),
    "physical_filter": ("filter",),
    "sourceId": ("id",),
    "coord_dec": ("coord_decl",),
}

#: Schema metadata key holding the ``{canonical: file column}`` mapping used for a file.
COLUMN_MAP_KEY = b"streamstars.column_map"
#: Schema metadata key holding the JSON list of files a table was read from.
SOURCE_FILES_KEY = b"streamstars.source_files"

PathType = str | PathLike[str]


@dataclass(frozen=True)
class ColumnSpec:
    """One column the configuration needs: canonical name, expected kind, required or not."""

    name: str
    kind: Kind
    required: bool


def local_background_flag_name(config: BuildStarsConfig) -> str:
    """The local-background flag column, derived as fgcmcal does.

    ``localBackground_instFlux`` -> ``localBackground_flag``.
    """
    field = config.localBackgroundFluxField
    stem = field[: -len("instFlux")] if field.endswith("instFlux") else field + "_"
    return stem + "flag"


def required_columns(config: BuildStarsConfig) -> list[ColumnSpec]:
    """The columns (canonical names) that :func:`read_source_table` reads for ``config``.

    Required columns make reading fail when absent; optional ones (``physical_filter``,
    ``band``, the PSF-candidate flag, ``detect_isPrimary``, the CD matrix) are read when present.
    A column needed twice is required when either need is.
    """
    specs: dict[str, ColumnSpec] = {}
    for spec in (*_measurement_columns(config), *_selector_columns(config),
                 *_other_columns(config)):
        old = specs.get(spec.name)
        if old is None:
            specs[spec.name] = spec
        elif spec.required and not old.required:
            specs[spec.name] = ColumnSpec(spec.name, old.kind, True)
    return list(specs.values())


def _measurement_columns(config: BuildStarsConfig) -> list[ColumnSpec]:
    """Identity, position and the three fluxes with their errors."""
    specs = [ColumnSpec(name, "int", True) for name in ("sourceId", "visit", "detector")]
    specs += [ColumnSpec(name, "float", True) for name in ("ra", "dec", "x", "y")]
    for flux in (config.instFluxField, config.apertureInnerInstFluxField,
                 config.apertureOuterInstFluxField):
        specs += [ColumnSpec(flux, "float", True), ColumnSpec(flux + "Err", "float", True)]
    return specs


def _selector_columns(config: BuildStarsConfig) -> list[ColumnSpec]:
    """The columns of the enabled cuts of the source selector."""
    sel = config.sourceSelector
    specs: list[ColumnSpec] = []
    if sel.doFlags:
        specs += [ColumnSpec(flag, "bool", True) for flag in sel.flags.bad]
    if sel.doUnresolved:
        specs.append(ColumnSpec(sel.unresolved.name, "float", True))
    if sel.doSignalToNoise:
        specs += [ColumnSpec(sel.signalToNoise.fluxField, "float", True),
                  ColumnSpec(sel.signalToNoise.errField, "float", True)]
    if sel.doIsolated:
        specs += [ColumnSpec(sel.isolated.parentName, "int", True),
                  ColumnSpec(sel.isolated.nChildName, "int", True)]
    if sel.doRequireFiniteRaDec:
        specs += [ColumnSpec(sel.requireFiniteRaDec.raColName, "float", True),
                  ColumnSpec(sel.requireFiniteRaDec.decColName, "float", True)]
    if sel.doRequirePrimary:
        specs.append(ColumnSpec(sel.requirePrimary.primaryColName, "bool", False))
    return specs


def _other_columns(config: BuildStarsConfig) -> list[ColumnSpec]:
    """Local background, PSF-candidate flag, filter and band, the CD matrix."""
    specs: list[ColumnSpec] = []
    if config.doSubtractLocalBackground:
        specs += [ColumnSpec(config.localBackgroundFluxField, "float", True),
                  ColumnSpec(local_background_flag_name(config), "bool", True)]
    specs += [ColumnSpec(config.psfCandidateName, "bool", False),
              ColumnSpec("physical_filter", "str", False), ColumnSpec("band", "str", False)]
    if config.doApplyWcsJacobian:
        specs += [ColumnSpec(name, "float", False) for name in CD_MATRIX_COLUMNS]
    return specs


def _swap_first(name: str) -> str:
    return name[:1].swapcase() + name[1:] if name else name


def _pandas_index_columns(schema: pa.Schema) -> list[str]:
    """Named (non-range) pandas index columns recorded in the schema metadata."""
    meta = schema.metadata or {}
    raw = meta.get(b"pandas")
    if raw is None:
        return []
    try:
        index = json.loads(raw).get("index_columns", [])
    except (ValueError, AttributeError):
        return []
    return [c for c in index if isinstance(c, str)]


def resolve_column(canonical: str, available: Sequence[str], index_columns: Sequence[str] = ()
                   ) -> str | None:
    """The file column holding canonical column ``canonical``, or ``None``.

    Tried in order: the name itself, its explicit aliases (:data:`ALIASES`; for ``sourceId``
    also the pandas index columns), each of those with the case of the first letter swapped
    (gen2 capitalised names), and finally a unique case-insensitive match.
    """
    present = set(available)
    candidates = [canonical]
    if canonical == "sourceId":
        candidates += [c for c in index_columns if c not in candidates]
    candidates += [a for a in ALIASES.get(canonical, ()) if a not in candidates]
    for cand in candidates:
        if cand in present:
            return cand
    for cand in candidates:
        swapped = _swap_first(cand)
        if swapped in present:
            return swapped
    for cand in candidates:
        matches = [a for a in available if a.lower() == cand.lower()]
        if len(matches) == 1:
            return matches[0]
    return None


def _near_matches(name: str, available: Sequence[str]) -> list[str]:
    lowered = {a.lower(): a for a in available}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.6)
    out = [lowered[c] for c in close]
    tail = name.split("_")[-1].lower()
    if len(out) < 5 and len(tail) > 2:
        out += [a for a in available if tail in a.lower() and a not in out][: 5 - len(out)]
    return out


def _where(path: str, visit: int | None) -> str:
    return f"{path} (visit {visit})" if visit is not None else path


def _kind_ok(kind: Kind, typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_null(typ):
        # An all-null column (e.g. written by pandas from all-None values): nulls of any kind.
        return True
    if kind == "float":
        return bool(pa.types.is_floating(typ) or pa.types.is_integer(typ))
    if kind == "int":
        return bool(pa.types.is_integer(typ))
    if kind == "bool":
        return bool(pa.types.is_boolean(typ))
    return bool(pa.types.is_string(typ) or pa.types.is_large_string(typ))


_TARGET: dict[Kind, pa.DataType] = {
    "float": pa.float64(),
    "int": pa.int64(),
    "bool": pa.bool_(),
    "str": pa.string(),
}


def _open(path: PathType, filesystem: pafs.FileSystem | None) -> pq.ParquetFile:
    spath = str(path)
    if filesystem is not None:
        info = filesystem.get_file_info(spath)
        if info.type == pafs.FileType.NotFound:
            raise SourceFileMissingError(f"{spath}: source table file missing")
        try:
            return pq.ParquetFile(filesystem.open_input_file(spath))
        except (OSError, pa.ArrowException) as exc:
            raise InputFileError(
                f"{spath}: cannot read source table (truncated or not parquet): {exc}"
            ) from exc
    if not Path(spath).exists():
        raise SourceFileMissingError(f"{spath}: source table file missing")
    try:
        return pq.ParquetFile(spath)
    except (OSError, pa.ArrowException) as exc:
        raise InputFileError(
            f"{spath}: cannot read source table (truncated or not parquet): {exc}"
        ) from exc


def _visit_of(pf: pq.ParquetFile, column: str | None) -> int | None:
    """Best-effort visit number for error messages (first row of the visit column)."""
    if column is None or pf.metadata.num_rows == 0:
        return None
    try:
        values = pf.read(columns=[column], use_pandas_metadata=False).column(0)
        first = values.drop_null()
        return int(first[0].as_py()) if len(first) else None
    except (OSError, pa.ArrowException, TypeError, ValueError):
        return None


def _read_one(
    path: PathType,
    config: BuildStarsConfig,
    filesystem: pafs.FileSystem | None,
    visit: int | None,
    allow_empty: bool,
) -> pa.Table:
    """One source table file as a canonical table (see the module docstring), checked."""
    spath = str(path)
    pf = _open(path, filesystem)
    try:
        schema = pf.schema_arrow
        specs = required_columns(config)
        mapping, missing = _column_mapping(specs, schema)
        file_visit = _visit_of(pf, mapping.get("visit"))
        where = _where(spath, visit if visit is not None else file_visit)
        kinds = {spec.name: spec.kind for spec in specs}
        _check_columns(where, schema, mapping, missing, kinds)
        file_columns = list(dict.fromkeys(mapping.values()))
        try:
            raw = pf.read(columns=file_columns, use_pandas_metadata=False)
        except (OSError, pa.ArrowException) as exc:
            raise InputFileError(
                f"{where}: cannot read source table (truncated or corrupt): {exc}"
            ) from exc
    finally:
        pf.close()
    arrays = [_canonical_column(raw.column(col), _TARGET[kinds[name]], col, where)
              for name, col in mapping.items()]
    meta = {
        COLUMN_MAP_KEY: json.dumps(mapping).encode(),
        SOURCE_FILES_KEY: json.dumps([spath]).encode(),
    }
    table = pa.Table.from_arrays(arrays, names=list(mapping)).replace_schema_metadata(meta)
    _check_content(table, [spath], visit, allow_empty)
    return table


def _column_mapping(specs: list[ColumnSpec],
                    schema: pa.Schema) -> tuple[dict[str, str], list[ColumnSpec]]:
    """``{canonical: file column}`` of the columns found and the required ones missing.  The
    CD matrix is all-or-nothing."""
    available = list(schema.names)
    index_columns = _pandas_index_columns(schema)
    mapping: dict[str, str] = {}
    missing: list[ColumnSpec] = []
    for spec in specs:
        found = resolve_column(spec.name, available, index_columns)
        if found is None:
            if spec.required:
                missing.append(spec)
        else:
            mapping[spec.name] = found
    cd_found = [c for c in CD_MATRIX_COLUMNS if c in mapping]
    if cd_found and len(cd_found) != len(CD_MATRIX_COLUMNS):
        for c in cd_found:
            del mapping[c]
    return mapping, missing


def _check_columns(where: str, schema: pa.Schema, mapping: dict[str, str],
                   missing: list[ColumnSpec], kinds: dict[str, Kind]) -> None:
    """Refuse missing required columns (naming near matches) and columns of the wrong type.

    Raises:
        InputFileError: required columns are missing.
        InvalidSourceTableError: a column has a type that cannot be read as its kind.
    """
    if missing:
        parts = []
        for spec in missing:
            near = _near_matches(spec.name, list(schema.names))
            hint = f" (near matches: {', '.join(near)})" if near else " (no near match)"
            parts.append(f"{spec.name!r}{hint}")
        raise InputFileError(
            f"{where}: required column(s) missing from source table: {'; '.join(parts)}"
        )
    for name, col in mapping.items():
        typ = schema.field(col).type
        if not _kind_ok(kinds[name], typ):
            raise InvalidSourceTableError(
                f"{where}: column {col!r} (for {name!r}) has type {typ}, "
                f"expected {kinds[name]}"
            )


def _canonical_column(array: pa.ChunkedArray, target: pa.DataType, col: str,
                      where: str) -> pa.ChunkedArray:
    """A file column cast to its canonical type.

    Raises:
        InvalidSourceTableError: the values cannot be cast.
    """
    if array.type == target:
        return array
    try:
        return array.cast(target)
    except (pa.ArrowException, ValueError) as exc:
        raise InvalidSourceTableError(
            f"{where}: column {col!r} cannot be read as {target}: {exc}"
        ) from exc


def _check_content(table: pa.Table, paths: Sequence[str], visit: int | None,
                   allow_empty: bool) -> None:
    """Row-level checks shared by one file and a set of files of one visit."""
    label = paths[0] if len(paths) == 1 else ", ".join(paths)
    if table.num_rows == 0:
        if allow_empty:
            return
        raise InvalidSourceTableError(
            f"{_where(label, visit)}: empty visit (the source table has zero rows)"
        )
    visits = table.column("visit")
    if visits.null_count:
        raise InvalidSourceTableError(
            f"{_where(label, visit)}: {visits.null_count} row(s) have a null visit"
        )
    uniq = np.unique(visits.to_numpy())
    where = _where(label, int(uniq[0]) if len(uniq) == 1 else visit)
    if len(uniq) > 1:
        shown = ", ".join(str(v) for v in uniq[:10])
        raise InvalidSourceTableError(
            f"{where}: mixed visits: {len(uniq)} visit values in one visit's source table "
            f"({shown}{' ...' if len(uniq) > 10 else ''})"
        )
    if visit is not None and int(uniq[0]) != visit:
        raise InvalidSourceTableError(
            f"{label}: source table holds visit {int(uniq[0])}, expected visit {visit}"
        )
    for name in ("sourceId", "detector"):
        nulls = table.column(name).null_count
        if nulls:
            raise InvalidSourceTableError(f"{where}: {nulls} row(s) have a null {name}")
    ids = np.sort(table.column("sourceId").to_numpy())
    dup = ids[1:][ids[1:] == ids[:-1]]
    if dup.size:
        shown = ", ".join(str(v) for v in np.unique(dup)[:5])
        raise InvalidSourceTableError(
            f"{where}: duplicate sourceIds: {dup.size} duplicate row(s), e.g. {shown}"
        )


def read_source_table(
    path: PathType,
    config: BuildStarsConfig,
    filesystem: pafs.FileSystem | None = None,
    *,
    visit: int | None = None,
) -> pa.Table:
    """Read one ``sourceTable_visit`` parquet file with canonical modern column names.

    Args:
        path: parquet file (local path, or a path inside ``filesystem``).
        config: selects the columns read (fluxes, flags, selector columns).
        filesystem: optional :class:`pyarrow.fs.FileSystem` (S3, GCS, ...).
        visit: the visit the file is expected to hold; a different visit is an error.

    Returns:
        A table with the canonical columns (ra/dec in degrees, float64; ids int64; flags bool),
        one row per source.  Schema metadata ``streamstars.column_map`` records which file
        column fed each canonical column.

    Raises:
        InputFileError: file missing, truncated or not parquet; required column missing.
        InvalidSourceTableError: wrong column type, zero rows, duplicate or null sourceIds,
            mixed visits, unexpected visit.
    """
    return _read_one(path, config, filesystem, visit, allow_empty=False)


def read_source_tables(
    paths: Sequence[PathType],
    config: BuildStarsConfig,
    filesystem: pafs.FileSystem | None = None,
    *,
    visit: int | None = None,
) -> pa.Table:
    """Read and concatenate several files holding parts of ONE visit.

    Each file is read as by :func:`read_source_table` (an individual empty part is allowed);
    then the union is checked: at least one row, one visit value across all files, no sourceId
    repeated across files.  Optional columns (``detect_isPrimary``, PSF candidate, ``band``, CD
    matrix ...) are kept only when every file has them.

    Args:
        paths: the parquet files of the visit (at least one).
        config: as for :func:`read_source_table`.
        filesystem: optional :class:`pyarrow.fs.FileSystem`.
        visit: the visit the files are expected to hold.

    Returns:
        The concatenated canonical table.

    Raises:
        InputFileError, InvalidSourceTableError: as for :func:`read_source_table`, across files.
    """
    if len(paths) == 0:
        raise InputFileError(
            f"no source table files given{f' for visit {visit}' if visit is not None else ''}"
        )
    if len(paths) == 1:
        return read_source_table(paths[0], config, filesystem, visit=visit)
    tables = [_read_one(p, config, filesystem, visit, allow_empty=True) for p in paths]
    common = [n for n in tables[0].column_names if all(n in t.column_names for t in tables)]
    maps = [json.loads((t.schema.metadata or {}).get(COLUMN_MAP_KEY, b"{}")) for t in tables]
    merged_map = {n: maps[0].get(n, n) for n in common}
    spaths = [str(p) for p in paths]
    meta = {
        COLUMN_MAP_KEY: json.dumps(merged_map).encode(),
        SOURCE_FILES_KEY: json.dumps(spaths).encode(),
    }
    table = pa.concat_tables([t.select(common).replace_schema_metadata(None) for t in tables])
    table = table.combine_chunks().replace_schema_metadata(meta)
    _check_content(table, spaths, visit, allow_empty=False)
    return table
