"""Tests of :mod:`streamstars.io.snapshot_files`: schemas, atomic replacement, round trips."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from streamstars import __version__, staging
from streamstars.columns import OBSERVATION_DTYPES
from streamstars.io.snapshot_catalogs import STAR_DTYPES, VISIT_ORDER
from streamstars.io.snapshot_files import (
    SnapshotCatalogs,
    SnapshotDirectoryError,
    compare_snapshots,
    read_snapshot,
    write_snapshot,
)

N_CCD = 4
FILTERS = ("HSC-R", "HSC-I")


def make_catalogs(seed: int = 1, n_stars: int = 7, n_visits: int = 3,
                  with_reference: bool = True, generation: int = 0) -> SnapshotCatalogs:
    """Small random but consistent catalogs (visits given unsorted on purpose)."""
    rng = np.random.default_rng(seed)
    visit_ids = np.array([1228, 903334, 1200][:n_visits] + list(range(2000, 2000 + n_visits - 3)),
                         dtype=np.int64)[:n_visits]
    visits: dict[str, np.ndarray] = {
        "visit": visit_ids,
        "physicalFilter": np.array(["HSC-R", "HSC-I", "HSC-R"][:n_visits]
                                   + ["HSC-I"] * max(0, n_visits - 3)),
        "telra": rng.uniform(0, 360, n_visits),
        "teldec": rng.uniform(-30, 30, n_visits),
        "telha": rng.uniform(-20, 20, n_visits),
        "telrot": rng.uniform(0, 90, n_visits),
        "mjd": 57000 + rng.uniform(0, 10, n_visits),
        "exptime": np.full(n_visits, 30.0),
        "pmb": np.array([np.nan] + [780.0] * (n_visits - 1)),
        "psfSigma": rng.uniform(1, 2, n_visits),
        "psfFwhm": rng.uniform(0.5, 1.0, n_visits),
        "skyBackground": rng.uniform(100, 200, n_visits),
        "deltaAper": rng.normal(0, 0.01, n_visits),
        "deltaAperDetector": rng.normal(0, 0.01, (n_visits, N_CCD)),
        "psfFwhmDetector": np.where(rng.random((n_visits, N_CCD)) < 0.2, -9999.0,
                                    rng.uniform(0.5, 1.0, (n_visits, N_CCD))),
        "scaling": np.ones((n_visits, N_CCD)),
        "deepFlag": np.zeros(n_visits, dtype=np.int32),
        "used": np.ones(n_visits, dtype=np.int32),
        "sources_read": np.ones(n_visits, dtype=bool),
    }
    n_obs = rng.integers(1, 5, n_stars).astype(np.int32)
    n_rows = int(n_obs.sum())
    obs_arr_index = (np.cumsum(n_obs) - n_obs).astype(np.int64)
    star_ra = rng.uniform(10, 20, n_stars)
    star_dec = rng.uniform(-5, 5, n_stars)
    owner = np.repeat(np.arange(n_stars), n_obs)
    observations = {
        "source_id": rng.integers(1, 2**62, n_rows),
        "visit": rng.choice(visit_ids, n_rows),
        "detector": rng.integers(0, N_CCD, n_rows).astype(np.int32),
        "ra": star_ra[owner] + rng.normal(0, 1e-5, n_rows),
        "dec": star_dec[owner] + rng.normal(0, 1e-5, n_rows),
        "x": rng.uniform(0, 2048, n_rows),
        "y": rng.uniform(0, 4096, n_rows),
        "psf_candidate": rng.random(n_rows) < 0.3,
        "inst_mag": rng.uniform(-12, -5, n_rows),
        "inst_mag_err": rng.uniform(0.001, 0.1, n_rows),
        "jacobian": rng.uniform(0.98, 1.02, n_rows),
        "delta_mag_bkg": np.zeros(n_rows),
        "delta_mag_aper": rng.normal(0, 0.02, n_rows),
        "delta_mag_err_aper": rng.uniform(0.001, 0.01, n_rows),
    }
    stars: dict[str, np.ndarray] = {
        "fgcm_id": rng.integers(2**40, 2**62, n_stars),
        "ra": star_ra,
        "dec": star_dec,
        "obs_arr_index": obs_arr_index,
        "n_obs": n_obs,
        "obj_flag": np.where(rng.random(n_stars) < 0.1, 1 << 16, 0).astype(np.int32),
    }
    reference = None
    if with_reference:
        n_ref = max(1, n_stars // 2)
        reference = {
            "fgcm_id": stars["fgcm_id"][:n_ref],
            "refMag": rng.uniform(15, 20, (n_ref, len(FILTERS))).astype(np.float32),
            "refMagErr": np.full((n_ref, len(FILTERS)), 0.02, dtype=np.float32),
        }
        reference["refMag"][0, 1] = 99.0
    metadata = {"visits": ",".join(str(v) for v in sorted(visit_ids)),
                "config": "matchRadius=1.0", "generation": str(generation),
                "created": f"2024-01-01T00:00:{generation % 60:02d}+00:00"}
    return SnapshotCatalogs(visits=visits, observations=observations, stars=stars,
                            reference=reference,
                            reference_filters=FILTERS if with_reference else (),
                            metadata=metadata)


@pytest.fixture()
def written(tmp_path: Path) -> tuple[Path, SnapshotCatalogs]:
    cats = make_catalogs()
    out = tmp_path / "snap"
    write_snapshot(out, cats, grace_seconds=0)
    return out, cats


ALL_FILES = {
    "fgcmVisitCatalog.fits", "fgcmStarObservations.fits", "fgcmStarIds.fits",
    "fgcmStarIndices.fits", "fgcmReferenceStars.fits", "fgcm_star_observations.parquet",
    "fgcm_star_ids.parquet", "fgcmVisitCatalog.parquet", "fgcm_reference_stars.parquet",
    "SNAPSHOT.json",
}


def test_files_written_and_returned(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    paths = write_snapshot(out, make_catalogs(), grace_seconds=0)
    assert {p.name for p in paths} == ALL_FILES
    assert set(os.listdir(out)) == ALL_FILES
    assert all(p.parent == out.absolute() for p in paths)
    assert os.listdir(tmp_path) == ["snap"]  # no temporary directory left behind


def test_without_reference_and_single_format(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    write_snapshot(out, make_catalogs(with_reference=False), formats=("parquet",))
    assert set(os.listdir(out)) == {"fgcm_star_observations.parquet", "fgcm_star_ids.parquet",
                                    "fgcmVisitCatalog.parquet", "SNAPSHOT.json"}
    out2 = tmp_path / "snap2"
    write_snapshot(out2, make_catalogs(with_reference=False), formats=("fits",))
    assert set(os.listdir(out2)) == {"fgcmVisitCatalog.fits", "fgcmStarObservations.fits",
                                     "fgcmStarIds.fits", "fgcmStarIndices.fits",
                                     "SNAPSHOT.json"}
    with pytest.raises(ValueError, match="formats"):
        write_snapshot(tmp_path / "x", make_catalogs(), formats=("csv",))


# ------------------------------------------------------------------ FITS schemas


def _fits_table(path: Path) -> tuple[fits.FITS_rec, fits.Header, fits.Header]:
    with fits.open(path) as hdus:
        assert len(hdus) == 2
        return hdus[1].data.copy(), hdus[0].header.copy(), hdus[1].header.copy()


def test_fits_visit_catalog(written: tuple[Path, SnapshotCatalogs]) -> None:
    out, cats = written
    data, primary, _ = _fits_table(out / "fgcmVisitCatalog.fits")
    assert list(data.columns.names) == list(VISIT_ORDER)
    formats = {c.name: c.format for c in data.columns}
    assert formats["visit"] == "K"
    assert formats["physicalFilter"] == "30A"
    for name in ("telra", "teldec", "telha", "telrot", "mjd", "exptime", "pmb", "psfSigma",
                 "psfFwhm", "skyBackground", "deltaAper"):
        assert formats[name] == "D", name
    for name in ("deltaAperDetector", "psfFwhmDetector", "scaling"):
        assert formats[name] == f"{N_CCD}D"
        assert data[name].shape == (3, N_CCD)
    assert formats["deepFlag"] == "J" and formats["used"] == "J"
    assert formats["sources_read"] == "L"
    order = np.argsort(cats.visits["visit"])
    np.testing.assert_array_equal(data["visit"], np.sort(cats.visits["visit"]))
    assert list(data["physicalFilter"]) == list(cats.visits["physicalFilter"][order])
    np.testing.assert_array_equal(data["psfFwhmDetector"], cats.visits["psfFwhmDetector"][order])
    np.testing.assert_array_equal(data["pmb"], cats.visits["pmb"][order])  # NaN kept
    assert data["sources_read"].dtype == np.bool_ and data["sources_read"].all()
    prov = json.loads(primary["SSPROV"])
    assert prov["config"] == "matchRadius=1.0"
    assert prov["streamstars_version"] == primary["SSVERSN"]
    assert "DATE" not in primary and "CHECKSUM" not in primary


def test_fits_observations_radians(written: tuple[Path, SnapshotCatalogs]) -> None:
    out, cats = written
    data, _, header = _fits_table(out / "fgcmStarObservations.fits")
    expected = {"ra": "D", "dec": "D", "x": "D", "y": "D", "psf_candidate": "L", "visit": "K",
                "ccd": "J", "instMag": "E", "instMagErr": "E", "jacobian": "E",
                "deltaMagBkg": "E", "deltaMagAper": "E", "sourceId": "K"}
    assert {c.name: c.format for c in data.columns} == expected
    assert data.columns["ra"].unit == "rad"
    o = cats.observations
    np.testing.assert_allclose(data["ra"], np.radians(o["ra"]), rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.degrees(data["dec"]), o["dec"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(data["ccd"], o["detector"])
    np.testing.assert_array_equal(data["visit"], o["visit"])
    np.testing.assert_array_equal(data["sourceId"], o["source_id"])
    np.testing.assert_array_equal(data["psf_candidate"], o["psf_candidate"])
    np.testing.assert_array_equal(data["instMag"], o["inst_mag"].astype(np.float32))


def test_fits_star_ids_and_indices(written: tuple[Path, SnapshotCatalogs]) -> None:
    out, cats = written
    ids, _, header = _fits_table(out / "fgcmStarIds.fits")
    assert {c.name: c.format for c in ids.columns} == {
        "fgcm_id": "K", "ra": "D", "dec": "D", "obsArrIndex": "J", "nObs": "J"}
    assert header["FGCMIDTY"] == "int64"
    np.testing.assert_array_equal(ids["fgcm_id"], cats.stars["fgcm_id"])
    np.testing.assert_array_equal(ids["ra"], cats.stars["ra"])
    n_obs = ids["nObs"].astype(np.int64)
    np.testing.assert_array_equal(ids["obsArrIndex"],
                                  np.concatenate(([0], np.cumsum(n_obs)[:-1])))
    idx, _, _ = _fits_table(out / "fgcmStarIndices.fits")
    assert idx.columns["obsIndex"].format == "J"
    obs, _, _ = _fits_table(out / "fgcmStarObservations.fits")
    assert n_obs.sum() == len(obs) == len(idx)
    np.testing.assert_array_equal(idx["obsIndex"], np.arange(len(obs)))
    # star i's observations lie around star i
    for i in range(len(ids)):
        rows = idx["obsIndex"][ids["obsArrIndex"][i]: ids["obsArrIndex"][i] + ids["nObs"][i]]
        assert np.all(np.abs(np.degrees(obs["ra"][rows]) - ids["ra"][i]) < 1e-3)


def test_fits_reference_headers(written: tuple[Path, SnapshotCatalogs]) -> None:
    out, cats = written
    data, primary, header = _fits_table(out / "fgcmReferenceStars.fits")
    assert {c.name: c.format for c in data.columns} == {
        "fgcm_id": "K", "refMag": "2E", "refMagErr": "2E"}
    for hdr in (primary, header):
        assert hdr["FILTERNAMES"] == "HSC-R,HSC-I"
        assert hdr["REFSTARS_FORMAT_VERSION"] == 1
    assert cats.reference is not None
    np.testing.assert_array_equal(data["refMag"], cats.reference["refMag"])
    assert data["refMag"][0, 1] == 99.0


# ------------------------------------------------------------------ parquet schemas


def test_parquet_schemas(written: tuple[Path, SnapshotCatalogs]) -> None:
    out, cats = written
    obs = pq.read_table(out / "fgcm_star_observations.parquet")
    assert obs.schema.remove_metadata() == pa.schema([
        ("ra", pa.float64()), ("dec", pa.float64()), ("x", pa.float32()), ("y", pa.float32()),
        ("visit", pa.int64()), ("detector", pa.int32()), ("inst_mag", pa.float32()),
        ("inst_mag_err", pa.float32()), ("jacobian", pa.float32()),
        ("delta_mag_bkg", pa.float32()), ("delta_mag_aper", pa.float32()),
        ("delta_mag_err_aper", pa.float32()), ("psf_candidate", pa.bool_()),
        ("source_id", pa.int64())])
    np.testing.assert_array_equal(obs["ra"].to_numpy(), cats.observations["ra"])  # degrees

    ids = pq.read_table(out / "fgcm_star_ids.parquet")
    assert ids.schema.remove_metadata() == pa.schema([
        ("fgcm_id", pa.int64()), ("ra", pa.float64()), ("dec", pa.float64()),
        ("obs_arr_index", pa.int64()), ("n_obs", pa.int32()), ("obj_flag", pa.int32())])
    n_obs = ids["n_obs"].to_numpy().astype(np.int64)
    assert n_obs.sum() == obs.num_rows
    np.testing.assert_array_equal(ids["obs_arr_index"].to_numpy(),
                                  np.concatenate(([0], np.cumsum(n_obs)[:-1])))
    prov = json.loads(ids.schema.metadata[b"streamstars"])
    assert prov["generation"] == "0" and prov["visits"] == "1200,1228,903334"

    visits = pq.read_table(out / "fgcmVisitCatalog.parquet")
    assert visits.column_names == list(VISIT_ORDER)
    assert visits.schema.field("physicalFilter").type == pa.string()
    assert visits.schema.field("scaling").type == pa.list_(pa.float64(), N_CCD)
    assert visits.schema.field("deepFlag").type == pa.int32()
    assert visits.schema.field("sources_read").type == pa.bool_()
    assert visits["visit"].to_pylist() == [1200, 1228, 903334]

    ref = pq.read_table(out / "fgcm_reference_stars.parquet")
    assert ref.schema.remove_metadata() == pa.schema([
        ("fgcm_id", pa.int64()), ("refMag", pa.list_(pa.float32(), 2)),
        ("refMagErr", pa.list_(pa.float32(), 2))])
    assert ref.schema.metadata[b"FILTERNAMES"] == b"HSC-R,HSC-I"
    assert ref.schema.metadata[b"REFSTARS_FORMAT_VERSION"] == b"1"


def test_manifest(written: tuple[Path, SnapshotCatalogs]) -> None:
    out, cats = written
    manifest = json.loads((out / "SNAPSHOT.json").read_text())
    assert set(manifest["files"]) == ALL_FILES - {"SNAPSHOT.json"}
    n_rows = len(cats.observations["visit"])
    assert manifest["files"]["fgcmStarObservations.fits"]["rows"] == n_rows
    assert manifest["files"]["fgcm_star_ids.parquet"]["rows"] == 7
    import hashlib
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert entry["bytes"] == (out / name).stat().st_size
    assert manifest["provenance"]["generation"] == "0"
    assert manifest["reference_filters"] == list(FILTERS)


# ------------------------------------------------------------------ validation


def test_invalid_catalogs_rejected(tmp_path: Path) -> None:
    cats = make_catalogs()
    cats.stars["obs_arr_index"] = cats.stars["obs_arr_index"] + 1
    with pytest.raises(ValueError, match="running sum"):
        write_snapshot(tmp_path / "a", cats)
    cats = make_catalogs()
    del cats.observations["jacobian"]
    with pytest.raises(ValueError, match="jacobian"):
        write_snapshot(tmp_path / "a", cats)
    cats = make_catalogs()
    cats.stars["n_obs"] = cats.stars["n_obs"].copy()
    cats.stars["n_obs"][-1] += 1
    with pytest.raises(ValueError, match="sum of n_obs"):
        write_snapshot(tmp_path / "a", cats)
    assert not (tmp_path / "a").exists()
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ atomic replacement


def test_replace_twice(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    write_snapshot(out, make_catalogs(seed=1, generation=1), grace_seconds=0)
    write_snapshot(out, make_catalogs(seed=2, n_stars=11, with_reference=False, generation=2),
                   grace_seconds=0)
    assert os.listdir(tmp_path) == ["snap"]
    assert "fgcmReferenceStars.fits" not in os.listdir(out)  # old files did not survive
    back = read_snapshot(out)
    assert back.metadata["generation"] == "2"
    assert len(back.stars["fgcm_id"]) == 11
    assert back.reference is None


def test_fallback_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "_renameat2", None)
    out = tmp_path / "snap"
    write_snapshot(out, make_catalogs(generation=1), grace_seconds=0)
    write_snapshot(out, make_catalogs(generation=2), grace_seconds=0)
    assert os.listdir(tmp_path) == ["snap"]
    assert read_snapshot(out).metadata["generation"] == "2"


def test_leftovers_of_crashed_writer_removed(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    (tmp_path / ".snap.tmp-deadbeef").mkdir()
    (tmp_path / ".snap.tmp-deadbeef" / "partial.fits").write_bytes(b"x")
    (tmp_path / ".other.tmp-deadbeef").mkdir()  # another snapshot's: untouched
    write_snapshot(out, make_catalogs(), grace_seconds=0)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-deadbeef", "snap"]


def test_refuses_unrelated_directory(tmp_path: Path) -> None:
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(SnapshotDirectoryError, match="does not write: thesis.tex"):
        write_snapshot(out, make_catalogs())
    assert os.listdir(out) == ["thesis.tex"]
    assert sorted(os.listdir(tmp_path)) == ["mydata"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SnapshotDirectoryError, match="not a directory"):
        write_snapshot(afile, make_catalogs())
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(SnapshotDirectoryError, match="symbolic link"):
        write_snapshot(link, make_catalogs())
    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    write_snapshot(empty, make_catalogs(), grace_seconds=0)
    assert "SNAPSHOT.json" in os.listdir(empty)


def test_concurrent_reader_never_sees_a_mix(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    write_snapshot(out, make_catalogs(generation=0), grace_seconds=0.05)
    stop = threading.Event()
    problems: list[str] = []
    checks = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                problems.append("snapshot directory missing")
                continue
            handles: dict[str, Any] = {}
            try:
                # reader protocol: list, then open every file through the directory fd at
                # once (open files stay readable even after the old snapshot is deleted)
                names = set(os.listdir(dir_fd))
                for fname in ("SNAPSHOT.json", "fgcm_star_ids.parquet",
                              "fgcm_star_observations.parquet", "fgcmStarIds.fits"):
                    handles[fname] = os.fdopen(os.open(fname, os.O_RDONLY, dir_fd=dir_fd), "rb")
                manifest = json.load(handles["SNAPSHOT.json"])
                expected = set(manifest["files"]) | {"SNAPSHOT.json"}
                if names != expected:
                    problems.append(f"listing {sorted(names)} != manifest {sorted(expected)}")
                gen = manifest["provenance"]["generation"]
                for fname in ("fgcm_star_ids.parquet", "fgcm_star_observations.parquet"):
                    table = pq.read_table(handles[fname])
                    tgen = json.loads(table.schema.metadata[b"streamstars"])["generation"]
                    if tgen != gen or table.num_rows != manifest["files"][fname]["rows"]:
                        problems.append(f"{fname}: generation {tgen} in snapshot {gen}")
                with fits.open(handles["fgcmStarIds.fits"]) as hdus:
                    if json.loads(hdus[0].header["SSPROV"])["generation"] != gen:
                        problems.append("fgcmStarIds.fits from another snapshot")
                checks[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                problems.append(f"{type(exc).__name__}: {exc}")
            finally:
                for handle in handles.values():
                    handle.close()
                os.close(dir_fd)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for gen in range(1, 21):
            write_snapshot(out, make_catalogs(seed=gen, n_stars=5 + gen, generation=gen,
                                              with_reference=bool(gen % 2)),
                           grace_seconds=0.1)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert checks[0] > 20
    assert os.listdir(tmp_path) == ["snap"]
    assert read_snapshot(out).metadata["generation"] == "20"


# ------------------------------------------------------------------ round trip / comparison


def test_read_snapshot_round_trip(written: tuple[Path, SnapshotCatalogs]) -> None:
    out, cats = written
    back = read_snapshot(out)
    order = np.argsort(cats.visits["visit"])
    for name, values in cats.visits.items():
        np.testing.assert_array_equal(back.visits[name], np.asarray(values)[order], err_msg=name)
    assert set(back.observations) == set(OBSERVATION_DTYPES)
    for name, dt in OBSERVATION_DTYPES.items():
        assert back.observations[name].dtype == dt
        expected = cats.observations[name]
        if name in ("ra", "dec", "source_id", "visit", "detector", "psf_candidate"):
            np.testing.assert_array_equal(back.observations[name], expected, err_msg=name)
        else:  # float32 on disk
            np.testing.assert_array_equal(back.observations[name],
                                          expected.astype(np.float32), err_msg=name)
    for name, values in cats.stars.items():
        np.testing.assert_array_equal(back.stars[name], values, err_msg=name)
        assert back.stars[name].dtype == STAR_DTYPES[name]
    assert back.reference is not None and cats.reference is not None
    for name, values in cats.reference.items():
        np.testing.assert_array_equal(back.reference[name], values)
    assert back.reference_filters == FILTERS
    assert back.metadata == {**cats.metadata, "streamstars_version": __version__}


def test_read_snapshot_from_fits_only(tmp_path: Path) -> None:
    cats = make_catalogs()
    out = tmp_path / "snap"
    write_snapshot(out, cats, formats=("fits",))
    back = read_snapshot(out)
    np.testing.assert_allclose(back.observations["ra"], cats.observations["ra"], atol=1e-12)
    np.testing.assert_array_equal(back.stars["fgcm_id"], cats.stars["fgcm_id"])
    np.testing.assert_array_equal(back.visits["physicalFilter"],
                                  cats.visits["physicalFilter"][np.argsort(cats.visits["visit"])])
    assert back.reference_filters == FILTERS
    assert back.metadata["generation"] == "0"


def test_determinism_and_compare(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_snapshot(a, make_catalogs())
    write_snapshot(b, make_catalogs())
    ma = json.loads((a / "SNAPSHOT.json").read_text())
    mb = json.loads((b / "SNAPSHOT.json").read_text())
    # same metadata (including 'created') -> byte-identical data files
    assert {k: v["sha256"] for k, v in ma["files"].items()} == \
        {k: v["sha256"] for k, v in mb["files"].items()}
    assert compare_snapshots(a, b) == []

    # only the timestamp differs: no difference reported by default
    other_time = make_catalogs()
    other_time.metadata["created"] = "2030-06-01T12:00:00+00:00"
    write_snapshot(c, other_time, grace_seconds=0)
    assert compare_snapshots(a, c) == []
    assert any("provenance" in d for d in compare_snapshots(a, c, ignore_metadata_keys=()))

    # a changed magnitude is detected in both formats
    changed = make_catalogs()
    changed.observations["inst_mag"][3] += 0.01
    write_snapshot(c, changed, grace_seconds=0)
    diffs = compare_snapshots(a, c)
    assert any("fgcm_star_observations.parquet" in d and "inst_mag" in d for d in diffs)
    assert any("fgcmStarObservations.fits" in d and "instMag" in d for d in diffs)
    assert not any("fgcmStarIds" in d for d in diffs)

    # a missing file and a changed header are detected
    write_snapshot(c, make_catalogs(with_reference=False), grace_seconds=0)
    diffs = compare_snapshots(a, c)
    assert any("fgcmReferenceStars.fits: only in" in d for d in diffs)
    other_filters = make_catalogs()
    other_filters.reference_filters = ("HSC-G", "HSC-I")
    write_snapshot(c, other_filters, grace_seconds=0)
    diffs = compare_snapshots(a, c)
    assert any("fgcmReferenceStars.fits" in d and "FILTERNAMES" in d for d in diffs)
    assert any("fgcm_reference_stars.parquet" in d for d in diffs)


def test_created_added_when_absent(tmp_path: Path) -> None:
    cats = make_catalogs()
    del cats.metadata["created"]
    write_snapshot(tmp_path / "s", cats)
    meta = read_snapshot(tmp_path / "s").metadata
    assert meta["created"].endswith("+00:00")
    assert meta["streamstars_version"] == __version__
    assert "created" not in cats.metadata  # the caller's dict is not modified


def test_empty_catalogs(tmp_path: Path) -> None:
    cats = make_catalogs(n_stars=0, with_reference=False)
    write_snapshot(tmp_path / "s", cats)
    back = read_snapshot(tmp_path / "s")
    assert len(back.stars["fgcm_id"]) == 0
    assert len(back.observations["ra"]) == 0
    with fits.open(tmp_path / "s" / "fgcmStarObservations.fits") as hdus:
        assert len(hdus[1].data) == 0


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="renameat2 is Linux-only")
def test_exchange_swaps_directories(tmp_path: Path) -> None:
    assert staging._renameat2 is not None
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "A").write_text("a")
    (b / "B").write_text("b")
    assert staging.exchange_directories(a, b)
    assert os.listdir(a) == ["B"] and os.listdir(b) == ["A"]
