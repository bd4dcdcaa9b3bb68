"""The HATS catalog ``fgcm_stars/`` and the flat files streamed from its partitions
(:mod:`streamstars.io.hats`, :mod:`streamstars.io.flat_stream`).

A simulated survey (with its reference catalog) is snapshotted once by today's one-shot writer;
its stars are then split into partitions by the HEALPix pixel of each star at order k (k = 0:
one partition, k = 6: ~4, k = 9: ~60), written as a HATS catalog, and the flat files are
streamed from the partitions.  The result must equal the one-shot snapshot (FITS files byte for
byte), and the catalog must open with hats, lsdb and nested-pandas with the flat files' rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import hats
import lsdb
import nested_pandas as npd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamstars.backfill import backfill
from streamstars.columns import OBSERVATION_DTYPES
from streamstars.config import BuildStarsConfig, RefcatLoadConfig
from streamstars.io import flat_stream
from streamstars.io.flat_stream import (
    finish_partitioned_snapshot,
    iter_merged_stars,
    write_flat_files,
)
from streamstars.io.hats import (
    CATALOG_DIR,
    PartitionFile,
    flatten_observations,
    list_partitions,
    partition_path,
    pixel_at_order,
    reuse_partition,
    write_partition,
)
from streamstars.io.snapshot_files import (
    FITS_FILES,
    PARQUET_FILES,
    SnapshotCatalogs,
    compare_snapshots,
    stage_snapshot,
    write_snapshot,
)
from streamstars.io.snapshot_parquet import compare_parquet
from streamstars.references import attach_references, open_reference_source
from streamstars.simulate import simulate_survey
from streamstars.snapshot import build_catalogs
from streamstars.state.store import StarStore

SIM_FILTERS = {"g_6": "g", "r_57": "r", "i_39": "i", "z_20": "z"}
CREATED = "2024-05-06T07:08:09Z"
#: order -> the range of partition counts it gives on the simulated 1-degree field
ORDERS = {0: (1, 1), 6: (3, 12), 9: (40, 150)}


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory: pytest.TempPathFactory) -> SnapshotCatalogs:
    """Today's snapshot catalogs of a simulated survey with its reference catalog."""
    tmp = tmp_path_factory.mktemp("hats_survey")
    repo = tmp / "repo"
    simulate_survey(repo, n_visits=10, seed=7, sources_per_visit=3000)
    config = BuildStarsConfig(fgcmLoadReferenceCatalog=RefcatLoadConfig(
        path=str(repo / "refcat"), filterMap=dict(SIM_FILTERS)))
    with StarStore.open(tmp / "state", config) as store:
        attach_references(store, open_reference_source(config.fgcmLoadReferenceCatalog))
        assert backfill(repo, store, progress=False).ok
        with store.read() as txn:
            cats, _ = build_catalogs(store, txn)
    assert cats.reference is not None and len(cats.reference["fgcm_id"]) > 100
    assert cats.reference_filters == ("g_6", "r_57", "i_39", "z_20")
    cats.metadata["created"] = CREATED
    return cats


def without_reference(cats: SnapshotCatalogs) -> SnapshotCatalogs:
    return dataclasses.replace(cats, reference=None, reference_filters=())


def shard_inputs(cats: SnapshotCatalogs, order: int) -> dict[int, tuple[dict[str, np.ndarray],
                                                                         dict[str, np.ndarray],
                                                                         dict[str, np.ndarray]
                                                                         | None]]:
    """pixel -> (stars, observations, reference) of the stars in that pixel at ``order``,
    with the stars shuffled (a shard's own order) and their observations regrouped."""
    s, o = cats.stars, cats.observations
    pixel = pixel_at_order(s["ra"], s["dec"], order)
    owner = np.repeat(np.arange(len(pixel)), s["n_obs"])
    rng = np.random.default_rng(order)
    out = {}
    for pix in np.unique(pixel):
        members = rng.permutation(np.flatnonzero(pixel == pix))
        stars = {k: v[members] for k, v in s.items()}
        rank = np.full(len(pixel), -1)
        rank[members] = np.arange(len(members))
        rows = np.flatnonzero(rank[owner] >= 0)
        rows = rows[np.argsort(rank[owner[rows]], kind="stable")]
        obs = {k: v[rows] for k, v in o.items()}
        ref = None
        if cats.reference is not None:
            keep = np.isin(cats.reference["fgcm_id"], stars["fgcm_id"])
            ref = {k: v[keep] for k, v in cats.reference.items()}
        out[int(pix)] = (stars, obs, ref)
    return out


def write_sharded(out: Path, cats: SnapshotCatalogs, order: int,
                  reuse_from: Path | None = None, rewrite: frozenset[int] = frozenset(),
                  **kwargs: object) -> list[PartitionFile]:
    """A snapshot written the sharded way: one partition per pixel, then the flat files.
    With ``reuse_from``, the partitions of that snapshot are hard-linked except ``rewrite``."""
    parts: list[PartitionFile] = []
    with stage_snapshot(out, grace_seconds=0) as staging:
        catalog = staging.path / CATALOG_DIR
        for pix, (stars, obs, ref) in shard_inputs(cats, order).items():
            if reuse_from is not None and pix not in rewrite:
                parts.append(reuse_partition(reuse_from / CATALOG_DIR, catalog, order, pix))
                continue
            part = write_partition(catalog, order, pix, stars, obs, ref, cats.reference_filters,
                                   metadata={"shard_txn": "42"}, row_group_observations=2000)
            assert part is not None
            parts.append(part)
        finish_partitioned_snapshot(staging, parts, visits=cats.visits, metadata=cats.metadata,
                                    reference_filters=cats.reference_filters,
                                    **kwargs)  # type: ignore[arg-type]
    # where the partitions are once the snapshot is in place
    return [dataclasses.replace(p, path=partition_path(out / CATALOG_DIR, p.order, p.pixel))
            for p in parts]


@pytest.fixture(scope="module")
def one_shot(catalogs: SnapshotCatalogs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("oneshot") / "snap"
    write_snapshot(out, catalogs, grace_seconds=0)
    return out


@pytest.fixture(scope="module")
def sharded(catalogs: SnapshotCatalogs,
            tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, list]]:
    out = {}
    for order in ORDERS:
        path = tmp_path_factory.mktemp(f"sharded{order}") / "snap"
        out[order] = (path, write_sharded(path, catalogs, order))
    return out


def expected_differences(a: Path, b: Path) -> list[str]:
    return [f"{CATALOG_DIR}: only in {b}"]


# --------------------------------------------------------------------------- same flat files


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_streamed_files_equal_one_shot(order: int, one_shot: Path,
                                       sharded: dict[int, tuple[Path, list]]) -> None:
    out, parts = sharded[order]
    low, high = ORDERS[order]
    assert low <= len(parts) <= high
    assert compare_snapshots(one_shot, out, ignore_manifest_keys=("partitions",)) == \
        expected_differences(one_shot, out)
    # without ignoring it, the manifest's new entry is the only other difference
    diffs = compare_snapshots(one_shot, out)
    assert diffs[:-1] == expected_differences(one_shot, out)
    assert diffs[-1].startswith("SNAPSHOT.json: differs") and "partitions" in diffs[-1]
    manifest = json.loads((out / "SNAPSHOT.json").read_text())
    assert manifest["partitions"] == {"written": len(parts), "reused": 0}
    # same provenance and metadata: the FITS files are the same bytes
    for name in FITS_FILES.values():
        assert (out / name).read_bytes() == (one_shot / name).read_bytes(), name
    for name in PARQUET_FILES.values():
        assert pq.read_schema(out / name) == pq.read_schema(one_shot / name)
    assert not list(out.glob(".merge-runs*"))


@pytest.mark.parametrize("order", [0, 6])
def test_without_reference(order: int, catalogs: SnapshotCatalogs, tmp_path: Path) -> None:
    cats = without_reference(catalogs)
    write_snapshot(tmp_path / "one", cats, grace_seconds=0)
    write_sharded(tmp_path / "sharded", cats, order)
    assert not (tmp_path / "sharded" / FITS_FILES["reference"]).exists()
    assert compare_snapshots(tmp_path / "one", tmp_path / "sharded",
                             ignore_manifest_keys=("partitions",)) == \
        expected_differences(tmp_path / "one", tmp_path / "sharded")
    assert "refMag" not in pq.read_schema(
        tmp_path / "sharded" / CATALOG_DIR / "dataset" / "_common_metadata").names


def test_parquet_only(catalogs: SnapshotCatalogs, one_shot: Path, tmp_path: Path) -> None:
    write_snapshot(tmp_path / "one", catalogs, formats=("parquet",), grace_seconds=0)
    write_sharded(tmp_path / "sharded", catalogs, 6, formats=("parquet",))
    assert not list((tmp_path / "sharded").glob("*.fits"))
    assert compare_snapshots(tmp_path / "one", tmp_path / "sharded",
                             ignore_manifest_keys=("partitions",)) == \
        expected_differences(tmp_path / "one", tmp_path / "sharded")


def test_two_partitionings_compare_equal(sharded: dict[int, tuple[Path, list]]) -> None:
    """Catalogs of different shard orders hold the same rows in other partitions."""
    a, b = sharded[0][0], sharded[9][0]
    assert compare_snapshots(a, b, ignore_manifest_keys=("partitions",)) == []


# --------------------------------------------------------------------------- the catalog


def flat_rows(out: Path) -> dict[str, pa.Table]:
    return {key: pq.read_table(out / name) for key, name in PARQUET_FILES.items()}


def test_catalog_layout(sharded: dict[int, tuple[Path, list]]) -> None:
    out, parts = sharded[6]
    cat = out / CATALOG_DIR
    props = dict(line.split("=", 1) for line in (cat / "properties").read_text().splitlines()
                 if "=" in line)
    assert (cat / "hats.properties").read_text() == (cat / "properties").read_text()
    n_stars = sum(p.n_stars for p in parts)
    assert props["obs_collection"] == "fgcm_stars" and props["dataproduct_type"] == "object"
    assert int(props["hats_nrows"]) == n_stars
    assert props["hats_col_ra"] == "ra" and props["hats_col_dec"] == "dec"
    assert props["hats_col_healpix"] == "_healpix_29" and props["hats_order"] == "6"
    assert int(props["hats_max_rows"]) == max(p.n_stars for p in parts)
    assert props["hats_creation_date"] == "2024-05-06T07:08UTC"
    assert props["hats_builder"].startswith("streamstars v")
    assert int(props["hats_estsize"]) > 0 and props["hats_version"] == "v1.0"
    lines = (cat / "partition_info.csv").read_text().splitlines()
    assert lines[0] == "Norder,Npix"
    assert [tuple(map(int, line.split(","))) for line in lines[1:]] == \
        sorted((6, p.pixel) for p in parts)
    for p in parts:
        assert p.path == cat / "dataset" / "Norder=6" / f"Dir={p.pixel // 10000 * 10000}" / \
            f"Npix={p.pixel}.parquet"
    meta = pq.read_metadata(cat / "dataset" / "_metadata")
    assert meta.num_rows == n_stars
    paths = {meta.row_group(i).column(0).file_path for i in range(meta.num_row_groups)}
    assert paths == {f"Norder=6/Dir={p.pixel // 10000 * 10000}/Npix={p.pixel}.parquet"
                     for p in parts}
    common = pq.read_schema(cat / "dataset" / "_common_metadata")
    assert common.metadata[b"FILTERNAMES"] == b"g_6,r_57,i_39,z_20"
    assert json.loads(common.metadata[b"streamstars"])["created"] == CREATED
    # rows sorted by fgcm_id, row groups of whole stars bounded in observations
    for p in parts:
        pf = pq.ParquetFile(p.path)
        ids = pf.read(columns=["fgcm_id"])["fgcm_id"].to_numpy()
        assert np.all(np.diff(ids) > 0)
        for i in range(pf.metadata.num_row_groups):
            rg = pf.metadata.row_group(i)
            assert [c.column_index for c in rg.sorting_columns] == [1]  # fgcm_id ascending
            n_obs = pf.read_row_group(i, columns=["n_obs"])["n_obs"].to_numpy()
            assert n_obs.sum() <= 2000 or len(n_obs) == 1
        info = json.loads(pf.schema_arrow.metadata[b"streamstars_partition"])
        assert info["order"] == 6 and info["pixel"] == p.pixel and info["shard_txn"] == "42"
        healpix = pf.read(columns=["_healpix_29"])["_healpix_29"].to_numpy()
        assert np.all(healpix >> (2 * (29 - 6)) == p.pixel)


def test_hats_and_lsdb_read_the_flat_rows(sharded: dict[int, tuple[Path, list]]) -> None:
    out, parts = sharded[9]
    cat_dir = out / CATALOG_DIR
    flat = flat_rows(out)

    hc = hats.read_hats(cat_dir)
    assert hc.catalog_info.total_rows == flat["stars"].num_rows
    assert sorted((p.order, p.pixel) for p in hc.get_healpix_pixels()) == \
        sorted((p.order, p.pixel) for p in parts)
    assert "observations" in hc.schema.names

    frame = lsdb.open_catalog(cat_dir).compute()
    assert isinstance(frame, npd.NestedFrame)
    assert frame.index.name == "_healpix_29"
    frame = frame.sort_values("fgcm_id")
    stars = flat["stars"]
    for col in ("fgcm_id", "ra", "dec", "n_obs", "obj_flag"):
        np.testing.assert_array_equal(frame[col].to_numpy(), stars[col].to_numpy(), err_msg=col)
    # the nested observations, star after star in id order, are the flat observation rows
    nested = frame["observations"].nest.to_flat()
    obs = flat["observations"]
    assert len(nested) == obs.num_rows
    for col in OBSERVATION_DTYPES:
        expected = obs[col].to_numpy()
        np.testing.assert_array_equal(nested[col].to_numpy().astype(expected.dtype), expected,
                                      err_msg=col)
    # reference magnitudes: null where a star matched no reference star
    has_ref = frame["refMag"].notna().to_numpy()
    ref = flat["reference"]
    np.testing.assert_array_equal(frame["fgcm_id"].to_numpy()[has_ref], ref["fgcm_id"].to_numpy())
    np.testing.assert_array_equal(np.stack(frame["refMag"][has_ref].to_numpy()),
                                  np.stack(ref["refMag"].to_numpy(zero_copy_only=False)))

    # lsdb's search on an opened catalog and sub-column loading work (struct-of-lists layout)
    ra0, dec0, radius = 150.1, 2.05, 0.3
    ras, decs = np.radians(stars["ra"].to_numpy()), np.radians(stars["dec"].to_numpy())
    cos_sep = (np.sin(decs) * np.sin(np.radians(dec0))
               + np.cos(decs) * np.cos(np.radians(dec0)) * np.cos(ras - np.radians(ra0)))
    sep = np.degrees(np.arccos(np.clip(cos_sep, -1, 1)))
    assert np.min(np.abs(sep - radius)) > 1e-6  # no star on the edge
    cone = lsdb.open_catalog(cat_dir).cone_search(ra0, dec0, radius * 3600).compute()
    assert 0 < len(cone) < len(frame)
    assert set(cone["fgcm_id"]) == set(stars["fgcm_id"].to_numpy()[sep < radius])
    partial = lsdb.open_catalog(cat_dir, columns=["fgcm_id", "observations.inst_mag"]).compute()
    assert list(partial["observations"].nest.columns) == ["inst_mag"]
    assert len(partial["observations"].nest.to_flat()) == obs.num_rows

    # nested-pandas reads one partition as a nested frame
    one = npd.read_parquet(parts[0].path)
    assert len(one) == parts[0].n_stars
    assert int(one["n_obs"].sum()) == parts[0].n_observations == \
        len(one["observations"].nest.to_flat())


# --------------------------------------------------------------------------- reuse


def test_reuse_hard_links_unchanged_partitions(catalogs: SnapshotCatalogs, one_shot: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "snap"
    first = write_sharded(out, catalogs, 6)
    inodes = {p.pixel: p.path.stat().st_ino for p in first}
    rewritten = first[0].pixel
    second = write_sharded(out, catalogs, 6, reuse_from=out, rewrite=frozenset({rewritten}))
    assert json.loads((out / "SNAPSHOT.json").read_text())["partitions"] == \
        {"written": 1, "reused": len(first) - 1}
    assert sum(p.reused for p in second) == len(first) - 1
    for p in second:
        now = p.path.stat().st_ino
        assert (now == inodes[p.pixel]) == (p.pixel != rewritten)
    assert compare_snapshots(one_shot, out, ignore_manifest_keys=("partitions",)) == \
        expected_differences(one_shot, out)
    assert [p.pixel for p in list_partitions(out / CATALOG_DIR)] == \
        sorted(p.pixel for p in first)
    # the old snapshot is gone, nothing is left beside the new one
    assert sorted(os.listdir(tmp_path)) == ["snap"]


def test_reused_partition_of_other_filters_refused(catalogs: SnapshotCatalogs,
                                                   tmp_path: Path) -> None:
    old = tmp_path / "old"
    write_sharded(old, without_reference(catalogs), 0)
    with pytest.raises(ValueError, match="schema"), \
            stage_snapshot(tmp_path / "new", grace_seconds=0) as staging:
        part = reuse_partition(old / CATALOG_DIR, staging.path / CATALOG_DIR, 0,
                               list_partitions(old / CATALOG_DIR)[0].pixel)
        finish_partitioned_snapshot(staging, [part], visits=catalogs.visits,
                                    metadata=catalogs.metadata,
                                    reference_filters=catalogs.reference_filters)
    assert not (tmp_path / "new").exists()  # the staging directory was dropped


# --------------------------------------------------------------------------- bounded merge


@pytest.mark.parametrize(("memory_bytes", "fan_in", "n_runs", "levels"), [
    (1, 64, 60, 5),       # below one row group: pairs, level after level (31+15+8+4+2 runs)
    (1 << 34, 8, 8, 1),   # the fan-in bound: 8 runs of <= 8 partitions, then one pass
])
def test_multi_level_merge(memory_bytes: int, fan_in: int, n_runs: int, levels: int,
                           catalogs: SnapshotCatalogs, one_shot: Path,
                           sharded: dict[int, tuple[Path, list]], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the memory or fan-in bound, partitions are first merged into sorted runs, which
    are merged in turn; the output is the same."""
    out, parts = sharded[9]
    flat = tmp_path / "flat"
    flat.mkdir()
    runs: list[Path] = []
    write_run = flat_stream._write_run

    def counting(path: Path, *args: object) -> None:
        runs.append(path)
        write_run(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(flat_stream, "_write_run", counting)
    rows = write_flat_files(flat, parts, visits=catalogs.visits, metadata=catalogs.metadata,
                            reference_filters=catalogs.reference_filters,
                            memory_bytes=memory_bytes, max_fan_in=fan_in)
    assert rows[FITS_FILES["stars"]] == len(catalogs.stars["fgcm_id"])
    assert len(parts) == 62
    assert len(runs) == n_runs
    assert {r.name.split("-")[1] for r in runs} == {str(level) for level in range(levels)}
    for name in FITS_FILES.values():
        assert (flat / name).read_bytes() == (one_shot / name).read_bytes(), name
    for name in PARQUET_FILES.values():  # bitwise, NaN included
        assert compare_parquet(name, one_shot / name, flat / name, ()) == []
    assert sorted(os.listdir(flat)) == sorted([*FITS_FILES.values(), *PARQUET_FILES.values()])


def test_merge_under_a_small_file_descriptor_limit(catalogs: SnapshotCatalogs, one_shot: Path,
                                                   sharded: dict[int, tuple[Path, list]],
                                                   tmp_path: Path) -> None:
    """More partitions than the process may open files: the merge opens one at a time."""
    out, parts = sharded[9]
    limit = 24
    assert len(parts) > 2 * limit
    script = textwrap.dedent(f"""
        import resource, sys, pickle
        resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))
        from pathlib import Path
        from streamstars.io.flat_stream import write_flat_files
        cats = pickle.load(open(sys.argv[1], "rb"))
        paths = [Path(p) for p in sys.argv[3:]]
        # the bound fits every partition's largest row group: one merge pass over them all
        write_flat_files(Path(sys.argv[2]), paths, visits=cats.visits, metadata=cats.metadata,
                         reference_filters=cats.reference_filters, memory_bytes=1 << 34,
                         max_fan_in=1000)
        print("ok")
    """)
    pickled = tmp_path / "cats.pickle"
    pickled.write_bytes(pickle.dumps(catalogs))
    flat = tmp_path / "flat"
    flat.mkdir()
    result = subprocess.run([sys.executable, "-c", script, str(pickled), str(flat),
                             *[str(p.path) for p in parts]],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in FITS_FILES.values():
        assert (flat / name).read_bytes() == (one_shot / name).read_bytes(), name
    # the same script fails when the files are kept open (the limit is real)
    keep_open = script.replace(
        "write_flat_files(", "handles = [open(p, 'rb') for p in paths]\n" + "write_flat_files(")
    failed = subprocess.run([sys.executable, "-c", keep_open, str(pickled), str(flat),
                             *[str(p.path) for p in parts]],
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "Too many open files" in failed.stderr


# --------------------------------------------------------------------------- refusals


def test_star_in_two_partitions_refused(catalogs: SnapshotCatalogs,
                                        sharded: dict[int, tuple[Path, list]],
                                        tmp_path: Path) -> None:
    cats = without_reference(catalogs)
    (pix, (stars, obs, _)), = list(shard_inputs(cats, 0).items())
    n = 3
    n_rows = int(stars["n_obs"][:n].sum())
    part = write_partition(tmp_path / "a", 0, pix, {k: v[:n] for k, v in stars.items()},
                           {k: v[:n_rows] for k, v in obs.items()})
    dup = write_partition(tmp_path / "b", 0, pix, {k: v[:n] for k, v in stars.items()},
                          {k: v[:n_rows] for k, v in obs.items()})
    assert part is not None and dup is not None
    with pytest.raises(ValueError, match="more than one partition"):
        list(iter_merged_stars([part, dup]))


def test_partition_checks(catalogs: SnapshotCatalogs, tmp_path: Path) -> None:
    cats = catalogs
    (pix, (stars, obs, ref)), *_ = list(shard_inputs(cats, 6).items())
    other = (pix + 1) % (12 * 4 ** 6)
    with pytest.raises(ValueError, match="outside the pixel"):
        write_partition(tmp_path, 6, other, stars, obs, ref, cats.reference_filters)
    bad = dict(stars, n_obs=stars["n_obs"] + 1)
    with pytest.raises(ValueError, match="n_obs"):
        write_partition(tmp_path, 6, pix, bad, obs, ref, cats.reference_filters)
    with pytest.raises(ValueError, match="reference rows need reference_filters"):
        write_partition(tmp_path, 6, pix, stars, obs, ref)
    assert ref is not None
    stray = dict(ref, fgcm_id=ref["fgcm_id"] + 1)
    with pytest.raises(ValueError, match="not in the partition"):
        write_partition(tmp_path, 6, pix, stars, obs, stray, cats.reference_filters)
    empty = {k: v[:0] for k, v in stars.items()}
    assert write_partition(tmp_path, 6, pix, empty, {k: v[:0] for k, v in obs.items()}) is None
    assert not partition_path(tmp_path, 6, pix).exists()
    with pytest.raises(ValueError, match="does not exist at order"):
        write_partition(tmp_path, 1, 48, stars, obs)


def test_list_of_struct_observations_read_too(sharded: dict[int, tuple[Path, list]]) -> None:
    """flatten_observations reads the nested column in either layout (struct of lists as
    written, or list<struct>) with the same result."""
    out, parts = sharded[6]
    table = pq.read_table(parts[0].path).slice(3, 50)
    column = table["observations"].combine_chunks()
    as_lists, lengths = flatten_observations(column)
    struct = pa.StructArray.from_arrays([as_lists[n] for n in as_lists], names=list(as_lists))
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    list_of_struct = pa.ListArray.from_arrays(pa.array(offsets), struct)
    again, lengths2 = flatten_observations(list_of_struct)
    np.testing.assert_array_equal(lengths, table["n_obs"].to_numpy())
    np.testing.assert_array_equal(lengths2, lengths)
    for name in as_lists:
        assert again[name].equals(as_lists[name]), name
    with pytest.raises(ValueError, match="neither"):
        flatten_observations(pa.array([1, 2]))


def test_no_star_at_all(catalogs: SnapshotCatalogs, tmp_path: Path) -> None:
    """An empty survey: no partition; the streamed files equal the one-shot writer's."""
    none = np.zeros(0, dtype=np.int64)
    empty = dataclasses.replace(
        catalogs,
        stars={k: v[none] for k, v in catalogs.stars.items()},
        observations={k: v[none] for k, v in catalogs.observations.items()},
        reference={k: v[none] for k, v in catalogs.reference.items()}  # type: ignore[union-attr]
    )
    write_snapshot(tmp_path / "one", empty, grace_seconds=0)
    assert write_sharded(tmp_path / "sharded", empty, 6) == []
    assert compare_snapshots(tmp_path / "one", tmp_path / "sharded",
                             ignore_manifest_keys=("partitions",)) == \
        expected_differences(tmp_path / "one", tmp_path / "sharded")
    for name in FITS_FILES.values():
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    cat = tmp_path / "sharded" / CATALOG_DIR
    assert (cat / "partition_info.csv").read_text() == "Norder,Npix\n"
    assert "hats_nrows=0" in (cat / "properties").read_text()
    assert pq.read_metadata(cat / "dataset" / "_metadata").num_rows == 0
