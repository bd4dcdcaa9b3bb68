"""Tests of repository discovery (pairing source tables with metadata by inside visit values)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamstars.io.discover import discover_repo, is_source_table_name, read_parquet_visits


def _source_table(path: Path, visits: list[int], detector: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(visits)
    table = pa.table(
        {
            "sourceId": np.arange(n, dtype=np.int64),
            "visit": np.array(visits, dtype=np.int64),
            "detector": np.full(n, detector, dtype=np.int64),
            "ra": np.linspace(150.0, 150.1, n),
            "dec": np.linspace(2.0, 2.1, n),
        }
    )
    pq.write_table(table, path)
    return path


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    return link


def test_source_table_names() -> None:
    assert is_source_table_name("sourceTable_visit_HSC_1176_run.parq")
    assert is_source_table_name("sourceTable_visit.parquet")
    assert is_source_table_name("sourceTable-849375.parq")
    assert not is_source_table_name("SRC-849375-12.parq")
    assert not is_source_table_name("visitTable.parq")


def test_read_parquet_visits(tmp_path: Path) -> None:
    single = _source_table(tmp_path / "a.parq", [5, 5, 5])
    assert read_parquet_visits(single).tolist() == [5]
    mixed = _source_table(tmp_path / "b.parq", [7, 5, 7])
    assert read_parquet_visits(mixed).tolist() == [5, 7]
    # Several row groups with different visits: statistics prove nothing single.
    table = pa.table({"visit": np.array([1, 1, 2, 2], dtype=np.int64)})
    pq.write_table(table, tmp_path / "c.parq", row_group_size=2)
    assert read_parquet_visits(tmp_path / "c.parq").tolist() == [1, 2]


def test_discover_hsc_tree(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    summaries = shared_data / "drp_tasks_visitSummary"
    # File names lie: the file called ..._1176 holds visit 17900 and vice versa.
    _link(summaries / "visitSummary_17900.fits", root / "meta" / "visitSummary_1176.fits")
    _link(summaries / "visitSummary_1176.fits", root / "meta" / "x" / "visitSummary_17900.fits")
    _link(summaries / "visitSummary_36434.fits", root / "visitSummary_36434.fits")
    # Source table named for visit 36434 but holding visit 1176; two files for 17900.
    _source_table(root / "src" / "sourceTable_visit_36434.parq", [1176, 1176])
    _source_table(root / "src" / "b" / "sourceTable_visit_17900.parq", [17900] * 3, detector=2)
    _source_table(root / "src" / "a" / "sourceTable_visit_17900.parq", [17900] * 3, detector=1)
    # A visit without metadata; a raw SRC file (ignored); a truncated parquet; mixed visits.
    _source_table(root / "src" / "sourceTable_visit_4242.parq", [4242])
    _source_table(root / "src" / "SRC-5555-12.parq", [5555])
    truncated = _source_table(root / "src" / "sourceTable_visit_trunc.parq", [36434] * 100)
    truncated.write_bytes(truncated.read_bytes()[:300])
    mixed = _source_table(root / "src" / "sourceTable_visit_mixed.parq", [4242, 7777])
    # An unreadable visitSummary.
    (root / "meta" / "visitSummary_broken.fits").write_text("not fits")

    inv = discover_repo(root)
    assert list(inv.visits) == [1176, 4242, 7777, 17900, 36434]
    assert 5555 not in inv.visits

    v1176 = inv.visits[1176]
    assert v1176.source_paths == [root / "src" / "sourceTable_visit_36434.parq"]
    assert v1176.metadata is not None and v1176.metadata.visit == 1176
    assert v1176.metadata.source.endswith("x/visitSummary_17900.fits")
    assert v1176.metadata_error is None

    v17900 = inv.visits[17900]
    assert v17900.source_paths == [
        root / "src" / "a" / "sourceTable_visit_17900.parq",
        root / "src" / "b" / "sourceTable_visit_17900.parq",
    ]
    assert v17900.metadata is not None and v17900.metadata.visit == 17900

    # Metadata only (its only source table is truncated).
    v36434 = inv.visits[36434]
    assert v36434.source_paths == [] and v36434.metadata is not None

    assert inv.visits[4242].source_paths == [root / "src" / "sourceTable_visit_4242.parq", mixed]
    assert inv.visits[7777].source_paths == [mixed]
    assert inv.visits_without_metadata == [4242, 7777]

    text = "\n".join(inv.problems)
    assert str(truncated) in text
    assert f"{mixed}: mixed visits [4242, 7777]" in text
    assert "visitSummary_broken.fits" in text
    assert len(inv.problems) == 3

    # Deterministic.
    again = discover_repo(root)
    assert again == inv


def test_discover_cfht_legacy_names(shared_data: Path, tmp_path: Path) -> None:
    cfht = shared_data / "jointcal_cfht_minimal"
    for name in (
        "sourceTable-849375.parq",
        "sourceTable-850587.parq",
        "SRC-849375-12.parq",
        "visitSummary-849375.fits",
    ):
        _link(cfht / name, tmp_path / "r" / name)
    inv = discover_repo(tmp_path)
    assert list(inv.visits) == [849375, 850587]
    assert inv.visits[849375].source_paths == [tmp_path / "r" / "sourceTable-849375.parq"]
    assert inv.visits[849375].metadata is not None
    assert inv.visits[849375].metadata.detectors == (12,)
    assert inv.visits_without_metadata == [850587]
    assert inv.problems == []


def _visit_tables(visit_dir: Path, ccd_dir: Path, suffix: str = "_HSC") -> tuple[Path, Path]:
    visit_dir.mkdir(parents=True, exist_ok=True)
    ccd_dir.mkdir(parents=True, exist_ok=True)
    vt = visit_dir / f"visitTable{suffix}.parq"
    ct = ccd_dir / f"ccdVisitTable{suffix}.parq"
    pq.write_table(
        pa.table(
            {
                "visitId": np.array([100, 200], dtype=np.int64),
                "physical_filter": ["HSC-R", "HSC-R"],
                "band": ["r", "r"],
                "ra": [150.0, 150.5],
                "decl": [2.0, 2.5],
                "skyRotation": [0.0, 0.0],
                "expTime": [30.0, 30.0],
                "expMidptMJD": [60000.1, 60000.2],
            }
        ),
        vt,
    )
    pq.write_table(
        pa.table(
            {
                "visitId": np.array([100, 100, 200], dtype=np.int64),
                "detector": np.array([0, 1, 0], dtype=np.int64),
                "psfSigma": [2.0, 2.2, 1.8],
                "seeing": [0.8, 0.9, 0.7],
                "skyBg": [10.0, 11.0, 12.0],
            }
        ),
        ct,
    )
    return vt, ct


def test_discover_visit_tables(shared_data: Path, tmp_path: Path) -> None:
    vt, _ = _visit_tables(tmp_path / "visitTable", tmp_path / "ccdVisitTable")
    _source_table(tmp_path / "src" / "sourceTable_visit_1.parq", [100])
    # A visitSummary wins over the visitTable for the same visit.
    _link(
        shared_data / "drp_tasks_visitSummary" / "visitSummary_1176.fits",
        tmp_path / "visitSummary_1176.fits",
    )
    _source_table(tmp_path / "src" / "sourceTable_visit_2.parq", [1176])
    inv = discover_repo(tmp_path, site_longitude_deg=-155.4761)
    assert list(inv.visits) == [100, 200, 1176]
    meta = inv.visits[100].metadata
    assert meta is not None and meta.detectors == (0, 1) and meta.psf_fwhm == pytest.approx(0.85)
    assert inv.visits[100].metadata_path == vt
    assert inv.visits[1176].metadata is not None
    assert inv.visits[1176].metadata.instrument == "HSC"
    assert inv.visits_without_metadata == []
    assert inv.problems == []


def test_discover_unpaired_ccd_table(tmp_path: Path) -> None:
    _visit_tables(tmp_path / "a", tmp_path / "b", suffix="_one")
    _visit_tables(tmp_path / "c", tmp_path / "d", suffix="_two")
    (tmp_path / "d" / "ccdVisitTable_two.parq").rename(tmp_path / "d" / "ccdVisitTable_x.parq")
    (tmp_path / "c" / "visitTable_two.parq").unlink()
    inv = discover_repo(tmp_path)
    assert list(inv.visits) == [100, 200]
    assert len(inv.problems) == 1 and "ccdVisitTable_x.parq" in inv.problems[0]


def test_discover_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        discover_repo(tmp_path / "nothing")
