"""The whole pipeline on real LSST data products (../shared/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamstars.cli import main
from streamstars.config import BuildStarsConfig
from streamstars.ingest import VisitInput, apply_visit
from streamstars.io.snapshot_files import read_snapshot
from streamstars.io.visitmeta import metadata_from_values
from streamstars.state.store import StarStore

CFHT_FILES = ("sourceTable-849375.parq", "sourceTable-850587.parq",
              "visitSummary-849375.fits", "visitSummary-850587.fits")


def test_cfht_two_visits_give_the_star_seen_twice(shared_data: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in CFHT_FILES:
        (repo / name).symlink_to(shared_data / "jointcal_cfht_minimal" / name)
    config = tmp_path / "c.toml"
    config.write_text('primaryBands = ["r"]\n')
    state, out = tmp_path / "state", tmp_path / "snap"
    assert main(["backfill", str(repo), "--state", str(state), "--config", str(config),
                 "--no-progress"]) == 0
    assert main(["snapshot", str(out), "--state", str(state)]) == 0
    catalogs = read_snapshot(out)
    np.testing.assert_array_equal(catalogs.visits["visit"], [849375, 850587])
    assert list(catalogs.visits["physicalFilter"]) == ["r.MP9601", "r.MP9601"]
    np.testing.assert_allclose(catalogs.visits["exptime"], 300.2, atol=0.05)
    assert len(catalogs.stars["fgcm_id"]) == 1
    assert catalogs.stars["n_obs"][0] == 2
    np.testing.assert_array_equal(np.sort(catalogs.observations["visit"]), [849375, 850587])
    # the star sits where both observations are (within the 1" match radius)
    assert abs(catalogs.stars["ra"][0] - 215.0397662) < 1e-5
    assert abs(catalogs.stars["dec"][0] - 52.8578627) < 1e-5
    assert catalogs.stars["fgcm_id"][0] == catalogs.observations["source_id"].min()


def test_legacy_hsc_source_table_with_explicit_metadata(shared_data: Path, tmp_path: Path) -> None:
    """The gen2-era HSC file (capitalised names, decl, no detect_isPrimary) is applied."""
    path = shared_data / "jointcal_hsc" / "subselected-sourceTable-0034690.parq"
    metadata = metadata_from_values({
        "visit": 34690, "physical_filter": "HSC-R", "band": "r", "telra": 337.81,
        "teldec": 0.8, "mjd": 56900.5, "exptime": 30.0, "site_longitude_deg": -155.4761})
    config = BuildStarsConfig(primaryBands=("r",), doSubtractLocalBackground=True)
    with StarStore.open(tmp_path / "state", config) as store:
        result = apply_visit(store, VisitInput(34690, [path], metadata))
        assert result.status == "applied"
        assert result.n_sources == 168
        assert 0 < result.n_selected < 168
        assert apply_visit(store, VisitInput(34690, [path], metadata)).status == "skipped"
        assert store.applied_visits().keys() == {34690}
