"""Tests of streamstars.io.sourcetable: real CFHT/HSC files, legacy layouts, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from streamstars.config import DEFAULT_BAD_FLAGS, BuildStarsConfig
from streamstars.errors import InputFileError, InvalidSourceTableError, SourceFileMissingError
from streamstars.io.sourcetable import (
    CD_MATRIX_COLUMNS,
    read_source_table,
    read_source_tables,
    resolve_column,
)

CFHT = "jointcal_cfht_minimal/sourceTable-849375.parq"
HSC = "jointcal_hsc/subselected-sourceTable-0034690.parq"


def modern_columns(n: int = 5, visit: int = 1234, first_id: int = 1) -> dict[str, Any]:
    """A small, valid modern-layout source table as a column dict."""
    rng = np.random.default_rng(first_id)
    cols: dict[str, Any] = {
        "sourceId": np.arange(first_id, first_id + n, dtype=np.int64),
        "visit": np.full(n, visit, dtype=np.int64),
        "detector": np.full(n, 40, dtype=np.int64),
        "ra": 150.0 + rng.uniform(0, 0.1, n),
        "dec": 2.0 + rng.uniform(0, 0.1, n),
        "x": rng.uniform(0, 2000, n),
        "y": rng.uniform(0, 4000, n),
        "apFlux_12_0_instFlux": np.full(n, 1.0e4),
        "apFlux_12_0_instFluxErr": np.full(n, 1.0e2),
        "apFlux_17_0_instFlux": np.full(n, 1.1e4),
        "apFlux_17_0_instFluxErr": np.full(n, 1.5e2),
        "extendedness": np.zeros(n),
        "parentSourceId": np.zeros(n, dtype=np.int64),
        "deblend_nChild": np.zeros(n, dtype=np.int32),
        "detect_isPrimary": np.ones(n, dtype=bool),
        "calib_psf_candidate": np.zeros(n, dtype=bool),
        "localBackground_instFlux": np.zeros(n),
        "localBackground_flag": np.zeros(n, dtype=bool),
        "physical_filter": ["HSC-I"] * n,
        "band": ["i"] * n,
    }
    for flag in DEFAULT_BAD_FLAGS:
        cols[flag] = np.zeros(n, dtype=bool)
    return cols


def write(path: Path, cols: dict[str, Any], metadata: dict[bytes, bytes] | None = None) -> Path:
    table = pa.table(cols)
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def legacy_columns(n: int = 4, visit: int = 34690) -> dict[str, Any]:
    """Gen2-era layout: capitalised names, decl, ccd, filter, id index, float32, no primary."""
    modern = modern_columns(n, visit)
    cols: dict[str, Any] = {}
    rename = {"dec": "decl", "detector": "ccd", "physical_filter": "filter", "sourceId": "id"}
    for name, values in modern.items():
        if name in ("detect_isPrimary", "band"):
            continue
        new = rename.get(name, name)
        if new not in ("ra", "decl", "x", "y", "visit", "ccd", "id", "filter", "extendedness",
                       "parentSourceId"):
            new = new[0].upper() + new[1:]
        arr = np.asarray(values)
        if arr.dtype == np.float64 and new not in ("ra", "decl"):
            arr = arr.astype(np.float32)
        cols[new] = arr
    for c in CD_MATRIX_COLUMNS:
        cols["L" + c[1:]] = np.full(n, 1e-9 if c.endswith(("1_1", "2_2")) else 0.0)
    return cols


def pandas_meta(index: str) -> dict[bytes, bytes]:
    return {b"pandas": json.dumps({"index_columns": [index], "columns": []}).encode()}


# --- real files ----------------------------------------------------------------------------


def test_cfht_modern_file(shared_data: Path) -> None:
    table = read_source_table(shared_data / CFHT, BuildStarsConfig())
    assert table.num_rows == 2
    names = table.column_names
    for name in ("sourceId", "visit", "detector", "ra", "dec", "x", "y", "physical_filter",
                 "apFlux_12_0_instFlux", "apFlux_17_0_instFluxErr", "pixelFlags_edge",
                 "centroid_flag", "extendedness", "parentSourceId", "deblend_nChild"):
        assert name in names
    # Column projection: columns the config does not need are not read.
    assert "coord_ra" not in names and "ixx" not in names and "runId" not in names
    assert "detect_isPrimary" not in names and "calib_psf_candidate" not in names
    assert table.column("sourceId").to_pylist() == [131329414033047692, 131329414033047693]
    assert table.column("visit").to_pylist() == [849375, 849375]
    assert table.column("physical_filter").to_pylist() == ["r", "r"]
    assert table.schema.field("ra").type == pa.float64()


def test_hsc_legacy_file(shared_data: Path) -> None:
    path = shared_data / HSC
    table = read_source_table(path, BuildStarsConfig())
    raw = pq.read_table(path, columns=["decl", "id", "ApFlux_12_0_instFlux", "Deblend_nChild"])
    assert table.num_rows == 168
    # dec comes from decl, fluxes from the capitalised gen2 names.
    np.testing.assert_array_equal(table.column("dec").to_numpy(), raw.column("decl").to_numpy())
    np.testing.assert_array_equal(table.column("sourceId").to_numpy(), raw.column("id").to_numpy())
    assert table.column("apFlux_12_0_instFlux").null_count == 19
    assert "calib_psf_candidate" in table.column_names
    for c in CD_MATRIX_COLUMNS:
        assert c in table.column_names
    assert set(table.column("detector").to_pylist()) == {48, 56, 64}
    assert set(table.column("physical_filter").to_pylist()) == {"HSC-R"}
    assert "detect_isPrimary" not in table.column_names
    # With doApplyWcsJacobian off the CD matrix is not read.
    no_jac = read_source_table(path, BuildStarsConfig(doApplyWcsJacobian=False))
    assert not any(c in no_jac.column_names for c in CD_MATRIX_COLUMNS)


def test_hsc_local_background_columns(shared_data: Path) -> None:
    table = read_source_table(shared_data / HSC, BuildStarsConfig(doSubtractLocalBackground=True))
    assert "localBackground_instFlux" in table.column_names
    assert "localBackground_flag" in table.column_names


def test_real_file_through_filesystem(shared_data: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(shared_data), pafs.LocalFileSystem())
    table = read_source_table(CFHT, BuildStarsConfig(), filesystem=fs)
    assert table.num_rows == 2
    with pytest.raises(SourceFileMissingError, match="missing"):
        read_source_table("nope.parq", BuildStarsConfig(), filesystem=fs)


def test_real_visits_together_mixed(shared_data: Path) -> None:
    paths = [shared_data / CFHT, shared_data / "jointcal_cfht_minimal/sourceTable-850587.parq"]
    with pytest.raises(InvalidSourceTableError, match="mixed visits"):
        read_source_tables(paths, BuildStarsConfig())


# --- legacy layouts on synthetic files -----------------------------------------------------


def test_legacy_layout(tmp_path: Path) -> None:
    path = write(tmp_path / "legacy.parq", legacy_columns(), pandas_meta("id"))
    table = read_source_table(path, BuildStarsConfig(doSubtractLocalBackground=True))
    assert table.num_rows == 4
    for name in ("sourceId", "detector", "dec", "physical_filter", "apFlux_12_0_instFlux",
                 "pixelFlags_edge", "centroid_flag", "calib_psf_candidate", "deblend_nChild",
                 "localBackground_instFlux", "localBackground_flag", *CD_MATRIX_COLUMNS):
        assert name in table.column_names, name
    assert table.schema.field("apFlux_12_0_instFlux").type == pa.float64()
    assert table.schema.field("detector").type == pa.int64()
    assert table.column("detector").to_pylist() == [40] * 4
    assert table.column("physical_filter").to_pylist() == ["HSC-I"] * 4


def test_source_id_from_pandas_index_with_other_name(tmp_path: Path) -> None:
    cols = modern_columns(3)
    cols["srcIdx"] = cols.pop("sourceId")
    path = write(tmp_path / "idx.parq", cols, pandas_meta("srcIdx"))
    table = read_source_table(path, BuildStarsConfig())
    assert table.column("sourceId").to_pylist() == [1, 2, 3]


def test_source_id_as_id_without_metadata(tmp_path: Path) -> None:
    cols = modern_columns(3)
    cols["id"] = cols.pop("sourceId")
    table = read_source_table(write(tmp_path / "id.parq", cols), BuildStarsConfig())
    assert table.column("sourceId").to_pylist() == [1, 2, 3]


def test_resolve_column_rules() -> None:
    assert resolve_column("dec", ["ra", "decl"]) == "decl"
    assert resolve_column("dec", ["dec", "decl"]) == "dec"
    assert resolve_column("pixelFlags_edge", ["PixelFlags_edge"]) == "PixelFlags_edge"
    assert resolve_column("detector", ["ccd"]) == "ccd"
    assert resolve_column("sourceId", ["id", "x"]) == "id"
    assert resolve_column("sourceId", ["foo"], ["foo"]) == "foo"
    assert resolve_column("extendedness", ["EXTENDEDNESS"]) == "EXTENDEDNESS"
    assert resolve_column("band", ["ra"]) is None


def test_optional_columns_absent(tmp_path: Path) -> None:
    cols = modern_columns(3)
    for name in ("band", "physical_filter", "calib_psf_candidate", "detect_isPrimary"):
        del cols[name]
    table = read_source_table(write(tmp_path / "min.parq", cols), BuildStarsConfig())
    assert table.num_rows == 3
    assert "band" not in table.column_names


def test_partial_cd_matrix_ignored(tmp_path: Path) -> None:
    cols = modern_columns(3)
    cols["localWcs_CDMatrix_1_1"] = np.ones(3)
    table = read_source_table(write(tmp_path / "cd.parq", cols), BuildStarsConfig())
    assert "localWcs_CDMatrix_1_1" not in table.column_names


# --- bad inputs ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceFileMissingError, match=r"missing.*") as err:
        read_source_table(tmp_path / "absent.parq", BuildStarsConfig())
    assert "absent.parq" in str(err.value)


def test_truncated_file(tmp_path: Path) -> None:
    good = write(tmp_path / "good.parq", modern_columns(50))
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 5, 10):
        bad = tmp_path / f"trunc{cut}.parq"
        bad.write_bytes(data[:cut])
        with pytest.raises(InputFileError, match="trunc") as err:
            read_source_table(bad, BuildStarsConfig())
        assert bad.name in str(err.value)


def test_not_parquet(tmp_path: Path) -> None:
    bad = tmp_path / "text.parq"
    bad.write_text("visit,ra,dec\n1,2,3\n" * 20)
    with pytest.raises(InputFileError, match="not parquet"):
        read_source_table(bad, BuildStarsConfig())


def test_missing_required_column_lists_near_matches(tmp_path: Path) -> None:
    cols = modern_columns(3)
    cols["apFlux_12_0_instFluxErrr"] = cols.pop("apFlux_12_0_instFluxErr")
    path = write(tmp_path / "miss.parq", cols)
    with pytest.raises(InputFileError) as err:
        read_source_table(path, BuildStarsConfig())
    msg = str(err.value)
    assert "miss.parq" in msg and "visit 1234" in msg
    assert "'apFlux_12_0_instFluxErr'" in msg and "apFlux_12_0_instFluxErrr" in msg
    assert not isinstance(err.value, InvalidSourceTableError)


def test_missing_column_only_needed_when_cut_enabled(tmp_path: Path) -> None:
    cols = modern_columns(3)
    del cols["extendedness"]
    path = write(tmp_path / "noext.parq", cols)
    with pytest.raises(InputFileError, match="extendedness"):
        read_source_table(path, BuildStarsConfig())
    from streamstars.config import SourceSelectorConfig

    config = BuildStarsConfig(sourceSelector=SourceSelectorConfig(doUnresolved=False))
    assert read_source_table(path, config).num_rows == 3


def test_wrong_dtype(tmp_path: Path) -> None:
    cols = modern_columns(3)
    cols["ra"] = [str(v) for v in cols["ra"]]
    path = write(tmp_path / "strra.parq", cols)
    with pytest.raises(InvalidSourceTableError, match=r"'ra'.*string") as err:
        read_source_table(path, BuildStarsConfig())
    assert "strra.parq" in str(err.value) and "visit 1234" in str(err.value)


def test_flag_not_boolean(tmp_path: Path) -> None:
    cols = modern_columns(3)
    cols["pixelFlags_edge"] = np.zeros(3)
    with pytest.raises(InvalidSourceTableError, match="pixelFlags_edge"):
        read_source_table(write(tmp_path / "f.parq", cols), BuildStarsConfig())


def test_empty_visit(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.parq", modern_columns(0))
    with pytest.raises(InvalidSourceTableError, match="empty visit"):
        read_source_table(path, BuildStarsConfig())


def test_duplicate_source_ids(tmp_path: Path) -> None:
    cols = modern_columns(5)
    cols["sourceId"][3] = cols["sourceId"][1]
    with pytest.raises(InvalidSourceTableError, match=r"duplicate sourceIds.*2") as err:
        read_source_table(write(tmp_path / "dup.parq", cols), BuildStarsConfig())
    assert "visit 1234" in str(err.value)


def test_null_source_id(tmp_path: Path) -> None:
    cols = modern_columns(3)
    cols["sourceId"] = pa.array([1, None, 3], type=pa.int64())
    with pytest.raises(InvalidSourceTableError, match="null sourceId"):
        read_source_table(write(tmp_path / "nullid.parq", cols), BuildStarsConfig())


def test_mixed_visits(tmp_path: Path) -> None:
    cols = modern_columns(4)
    cols["visit"][2] = 999
    with pytest.raises(InvalidSourceTableError, match=r"mixed visits.*999"):
        read_source_table(write(tmp_path / "mixed.parq", cols), BuildStarsConfig())


def test_unexpected_visit(tmp_path: Path) -> None:
    path = write(tmp_path / "v.parq", modern_columns(3, visit=5))
    with pytest.raises(InvalidSourceTableError, match="expected visit 6"):
        read_source_table(path, BuildStarsConfig(), visit=6)
    assert read_source_table(path, BuildStarsConfig(), visit=5).num_rows == 3


# --- several files of one visit -------------------------------------------------------------


def test_read_source_tables_concatenates(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parq", modern_columns(3, first_id=1))
    legacy = legacy_columns(2, visit=1234)
    legacy["id"] = np.array([10, 11], dtype=np.int64)
    b = write(tmp_path / "b.parq", legacy, pandas_meta("id"))
    empty = write(tmp_path / "c.parq", modern_columns(0))
    table = read_source_tables([a, b, empty], BuildStarsConfig())
    assert table.num_rows == 5
    assert table.column("sourceId").to_pylist() == [1, 2, 3, 10, 11]
    # detect_isPrimary and band are missing from the legacy part: dropped for the visit.
    assert "detect_isPrimary" not in table.column_names
    assert "band" not in table.column_names
    assert json.loads(table.schema.metadata[b"streamstars.source_files"]) == [
        str(a), str(b), str(empty)
    ]


def test_read_source_tables_checks_across_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parq", modern_columns(3, first_id=1))
    dup = write(tmp_path / "dup.parq", modern_columns(3, first_id=3))
    other = write(tmp_path / "other.parq", modern_columns(3, visit=77, first_id=100))
    empty = write(tmp_path / "empty.parq", modern_columns(0))
    with pytest.raises(InvalidSourceTableError, match="duplicate sourceIds"):
        read_source_tables([a, dup], BuildStarsConfig())
    with pytest.raises(InvalidSourceTableError, match="mixed visits"):
        read_source_tables([a, other], BuildStarsConfig())
    with pytest.raises(InvalidSourceTableError, match="empty visit"):
        read_source_tables([empty, empty], BuildStarsConfig())
    with pytest.raises(InputFileError, match="no source table files"):
        read_source_tables([], BuildStarsConfig())
    with pytest.raises(SourceFileMissingError, match="missing"):
        read_source_tables([a, tmp_path / "gone.parq"], BuildStarsConfig())


def test_encodings_normalised(tmp_path: Path) -> None:
    """Dictionary / large strings and float32 coordinates come back as string / float64."""
    cols = modern_columns(4)
    cols["physical_filter"] = pa.array(cols["physical_filter"]).dictionary_encode()
    cols["band"] = pa.array(cols["band"], type=pa.large_string())
    cols["ra"] = cols["ra"].astype(np.float32)
    table = read_source_table(write(tmp_path / "enc.parq", cols), BuildStarsConfig())
    assert table.schema.field("physical_filter").type == pa.string()
    assert table.schema.field("band").type == pa.string()
    assert table.schema.field("ra").type == pa.float64()
    assert table.column("physical_filter").to_pylist() == ["HSC-I"] * 4
