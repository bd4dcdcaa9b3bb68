"""The snapshot of a sharded state publishes exactly the catalogs of one unsharded store, for
any shard size, with stars on shard borders and corners, at RA 0/360 and near a pole, for any
number of workers, and incrementally."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import healpy as hp
import numpy as np
import pytest
from survey_helpers import PreparedSurvey, prepare_survey

from streamstars.columns import take
from streamstars.config import BuildStarsConfig, RefcatLoadConfig
from streamstars.ingest import PreparedVisit, apply_prepared, retract_visit
from streamstars.io.snapshot_files import compare_snapshots, read_snapshot
from streamstars.references import attach_references
from streamstars.sharded_snapshot import ENV_KILL_AFTER_PARTITIONS, write_state_snapshot
from streamstars.snapshot import write_store_snapshot
from streamstars.state import StarStore, StateDirectory

SIM_FILTERS = {"g_6": "g", "r_57": "r", "i_39": "i", "z_20": "z"}
MARGIN = 10.0  # arcsec
#: what a sharded snapshot adds beside the flat files: the catalog and the shards' manifest
SHARDED_ONLY = ("partitions", "shards", "reuse_key", "margin_violations")


def _config(survey: Path | None = None, **changes: object) -> BuildStarsConfig:
    refcat = RefcatLoadConfig(path=str(survey / "refcat"), filterMap=dict(SIM_FILTERS)) \
        if survey is not None else RefcatLoadConfig()
    # density-cut pixels nest inside shards of up to nside 1024
    return dataclasses.replace(BuildStarsConfig(densityCutNside=1024,
                                                fgcmLoadReferenceCatalog=refcat), **changes)


class ShardedStores:
    """A state directory of shards of ``nside`` (margin ``margin``): each visit routed to its
    shards (core + margin) and applied in each shard's own transaction by the ingest."""

    def __init__(self, root: Path, config: BuildStarsConfig, nside: int,
                 margin: float = MARGIN) -> None:
        self.root = root
        self.config = dataclasses.replace(config, shardNside=nside, shardMargin=margin)
        with StateDirectory.open(root, self.config) as state:
            self.references = attach_references(state)

    def refs(self) -> list[tuple[int, int]]:
        with StateDirectory.open(self.root, readonly=True) as state:
            return state.shards()

    def apply(self, prepared: PreparedVisit) -> None:
        with StateDirectory.open(self.root, self.config) as state:
            apply_prepared(state, prepared, references=self.references)

    def retract(self, visit: int) -> None:
        with StateDirectory.open(self.root, self.config) as state:
            retract_visit(state, visit)

    def snapshot(self, out: Path, workers: int = 1) -> dict[str, object]:
        with StateDirectory.open(self.root, readonly=True) as state:
            summary = write_state_snapshot(state, out, workers=workers)
        manifest = json.loads((out / "SNAPSHOT.json").read_text())
        assert manifest["partitions"] == {"written": summary.written, "reused": summary.reused}
        return manifest


def _single(root: Path, survey: PreparedSurvey, visits: list[int],
            shards: ShardedStores) -> Path:
    """The snapshot of one unsharded store holding ``visits`` (indices), with the state's
    configuration (the shard keys are part of the published ``config`` provenance)."""
    with StarStore.open(root / "single", shards.config) as store:
        references = attach_references(store)
        for i in visits:
            apply_prepared(store, survey.visits[i], references=references)
        write_store_snapshot(store, root / "single-snap")
    return root / "single-snap"


def _same_data(single: Path, sharded: Path) -> None:
    diffs = [d for d in compare_snapshots(single, sharded, ignore_manifest_keys=SHARDED_ONLY)
             if not d.startswith("fgcm_stars")]
    assert diffs == []


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> PreparedSurvey:
    root = tmp_path_factory.mktemp("crowded")
    return prepare_survey(root / "repo", _config(root / "repo"), n_visits=8, seed=21,
                          sources_per_visit=2500, crowded=True, border_nside=64)


@pytest.mark.parametrize("nside", [4, 64, 512])  # 1 shard, a few, ~100
def test_any_shard_size_publishes_the_unsharded_catalogs(crowded: PreparedSurvey,
                                                         nside: int, tmp_path: Path) -> None:
    shards = ShardedStores(tmp_path / "state", crowded.config, nside)
    for prepared in crowded.visits:
        shards.apply(prepared)
    manifest = shards.snapshot(tmp_path / "snap")
    assert manifest["margin_violations"] == 0
    n_shards = len(shards.refs())
    assert {4: n_shards == 1, 64: 2 <= n_shards <= 12, 512: n_shards >= 60}[nside], n_shards
    single = _single(tmp_path, crowded, list(range(len(crowded.visits))), shards)
    _same_data(single, tmp_path / "snap")
    stars = read_snapshot(tmp_path / "snap").stars["fgcm_id"]
    assert len(stars) > 300 and len(np.unique(stars)) == len(stars)


@pytest.mark.parametrize(("ra", "dec"), [(0.0, 0.0), (0.0, 89.7)])
def test_ra_0_and_a_pole(ra: float, dec: float, tmp_path: Path) -> None:
    survey = prepare_survey(tmp_path / "repo", _config(), n_visits=6, seed=5,
                            sources_per_visit=1500, ra_center=ra, dec_center=dec,
                            field_radius_deg=0.4, border_nside=256, write_refcat=False)
    shards = ShardedStores(tmp_path / "state", survey.config, 256)
    for prepared in survey.visits:
        shards.apply(prepared)
    assert len(shards.refs()) >= 4
    assert shards.snapshot(tmp_path / "snap")["margin_violations"] == 0
    _same_data(_single(tmp_path, survey, list(range(6)), shards), tmp_path / "snap")


def test_workers_and_visit_order_do_not_change_the_catalogs(crowded: PreparedSurvey,
                                                            tmp_path: Path) -> None:
    in_order = ShardedStores(tmp_path / "a", crowded.config, 128)
    shuffled = ShardedStores(tmp_path / "b", crowded.config, 128)
    for prepared in crowded.visits:
        in_order.apply(prepared)
    for i in np.random.default_rng(3).permutation(len(crowded.visits)):
        shuffled.apply(crowded.visits[i])
    in_order.snapshot(tmp_path / "one", workers=1)
    shuffled.snapshot(tmp_path / "two", workers=2)
    assert compare_snapshots(tmp_path / "one", tmp_path / "two",
                             ignore_manifest_keys=("shards",)) == []


def test_incremental_snapshots_equal_fresh_ones(crowded: PreparedSurvey, tmp_path: Path) -> None:
    shards = ShardedStores(tmp_path / "state", crowded.config, 256)
    visits = crowded.visits
    for prepared in visits[:6]:
        shards.apply(prepared)
    out = tmp_path / "snap"
    first = shards.snapshot(out)
    assert first["partitions"]["reused"] == 0
    # nothing changed: every partition is reused and the data stay the same
    again = shards.snapshot(out)
    assert again["partitions"] == {"written": 0, "reused": first["partitions"]["written"]}
    # one more visit: only the shards it touched are recomputed
    shards.apply(visits[6])
    after_visit = shards.snapshot(out)
    assert 0 < after_visit["partitions"]["written"] < len(shards.refs())
    assert after_visit["partitions"]["reused"] > 0
    shards.snapshot(tmp_path / "fresh")
    assert compare_snapshots(out, tmp_path / "fresh",
                             ignore_manifest_keys=("partitions",)) == []
    _same_data(_single(tmp_path / "s7", crowded, list(range(7)), shards), out)
    # replaced and retracted visits: recomputed where they were
    shards.retract(visits[2].visit)
    shards.snapshot(out)
    _same_data(_single(tmp_path / "s6", crowded, [0, 1, 3, 4, 5, 6], shards), out)


def test_a_star_crossing_a_border_is_published_once_by_its_new_owner(tmp_path: Path) -> None:
    """After every visit the shards publish each star once, as the unsharded store does —
    also the stars on shard borders, whose position moves across a border as visits come
    (a later primary band takes a star over, or its mean moves)."""
    nside = 128
    survey = prepare_survey(tmp_path / "repo", _config(), n_visits=10, seed=4,
                            sources_per_visit=1500, border_nside=nside, write_refcat=False)
    shards = ShardedStores(tmp_path / "state", survey.config, nside)
    owners: dict[int, set[int]] = {}
    for k, prepared in enumerate(survey.visits):
        shards.apply(prepared)
        out = tmp_path / "snap"
        shards.snapshot(out)
        _same_data(_single(tmp_path / f"s{k}", survey, list(range(k + 1)), shards), out)
        stars = read_snapshot(out).stars
        pixels = hp.ang2pix(nside, stars["ra"], stars["dec"], lonlat=True, nest=True)
        for star, pixel in zip(stars["fgcm_id"].tolist(), pixels.tolist(), strict=True):
            owners.setdefault(star, set()).add(pixel)
    assert sum(len(p) > 1 for p in owners.values()) >= 1, "no star changed owner"


def test_a_chain_longer_than_the_margin_is_reported(crowded: PreparedSurvey, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A friends-of-friends chain crossing a shard border and reaching past the margin is a
    violation: counted in SNAPSHOT.json and logged with the shard and position."""
    nside, margin = 64, MARGIN
    base = crowded.visits[0]
    pixel = int(hp.vec2pix(nside, *hp.ang2vec(base.observations["ra"][0],
                                              base.observations["dec"][0], lonlat=True),
                           nest=True))
    corner = np.asarray(hp.boundaries(nside, pixel, step=1, nest=True))[:, 0]
    ra0, dec0 = hp.vec2ang(corner, lonlat=True)
    # 60 observations 0.8" apart along RA through the corner, in two visits of one band
    steps = (np.arange(60) - 30) * 0.8 / 3600.0
    chain_ra = ra0[0] + steps / np.cos(np.radians(dec0[0]))
    visits = []
    for k, prepared in enumerate(crowded.visits[:5:4]):  # visits 0 and 4: the same band
        obs = take(prepared.observations, np.zeros(60, dtype=np.int64))
        obs["ra"] = chain_ra + (k * 0.05 / 3600.0)
        obs["dec"] = np.full(60, dec0[0])
        obs["source_id"] = prepared.observations["source_id"].max() + 1 + np.arange(60)
        visits.append(dataclasses.replace(prepared, observations=obs))
    assert visits[0].band == visits[1].band
    shards = ShardedStores(tmp_path / "state", crowded.config, nside, margin)
    for prepared in visits:
        shards.apply(prepared)
    with caplog.at_level(logging.WARNING, logger="streamstars.sharded_snapshot"):
        manifest = shards.snapshot(tmp_path / "snap")
    assert manifest["margin_violations"] > 0
    found = [v for e in manifest["shards"].values() for v in e["margin_violations"]]
    assert {v["band"] for v in found} == {visits[0].band}
    assert any("friends-of-friends chain" in r.getMessage() for r in caplog.records)


def test_sigkill_during_a_snapshot_leaves_the_previous_one_intact(crowded: PreparedSurvey,
                                                                  tmp_path: Path) -> None:
    """A snapshot process killed (SIGKILL) after writing some of its partitions: the previous
    snapshot in OUT is untouched, and the next snapshot completes and equals a fresh one."""
    shards = ShardedStores(tmp_path / "state", crowded.config, 256)
    for prepared in crowded.visits[:6]:
        shards.apply(prepared)
    out = tmp_path / "snap"
    shards.snapshot(out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
              if p.is_file()}
    for prepared in crowded.visits[6:]:
        shards.apply(prepared)
    killed = subprocess.run(
        [sys.executable, "-m", "streamstars.cli", "snapshot", str(out), "--state",
         str(tmp_path / "state")], capture_output=True, text=True, timeout=600,
        env={**os.environ, ENV_KILL_AFTER_PARTITIONS: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".snap")], \
        "the killed snapshot left no staging directory: it was not killed mid-way"
    manifest = shards.snapshot(out)  # cleans the dead staging directory, reuses nothing stale
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".snap")]
    assert manifest["partitions"]["written"] > 0
    shards.snapshot(tmp_path / "fresh")
    assert compare_snapshots(out, tmp_path / "fresh",
                             ignore_manifest_keys=("partitions",)) == []
