"""The catalogs of fixed simulated surveys equal those written by earlier code, byte for byte
in their data (tests/data/golden_snapshots.json).

The digests were written by the code before the structural redesign; any change of the
published data shows here.  A deliberate change of the outputs regenerates them with
``STREAMSTARS_UPDATE_GOLDEN=1 pytest tests/test_golden_outputs.py`` — and says why in the
commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from golden import digest_differences, snapshot_digest

from streamstars.backfill import backfill
from streamstars.config import BuildStarsConfig, RefcatLoadConfig
from streamstars.references import attach_references, open_reference_source
from streamstars.simulate import simulate_survey
from streamstars.snapshot import write_store_snapshot
from streamstars.state.store import StarStore

GOLDEN = Path(__file__).parent / "data" / "golden_snapshots.json"
SIM_FILTERS = {"g_6": "g", "r_57": "r", "i_39": "i", "z_20": "z"}

#: name -> (simulate arguments, whether the reference catalog is matched)
SURVEYS: dict[str, tuple[dict[str, object], bool]] = {
    "plain_with_refcat": ({"n_visits": 10, "seed": 7, "sources_per_visit": 3000}, True),
    "crowded": ({"n_visits": 8, "seed": 11, "sources_per_visit": 3000, "crowded": True}, False),
    "ra0_near_pole": ({"n_visits": 6, "seed": 5, "sources_per_visit": 2000, "ra_center": 0.0,
                       "dec_center": 87.5, "field_radius_deg": 0.5}, False),
}


def _build(name: str, tmp_path: Path) -> dict[str, dict[str, str]]:
    simulate_args, with_refcat = SURVEYS[name]
    repo = tmp_path / "repo"
    simulate_survey(repo, **simulate_args)  # type: ignore[arg-type]
    config = BuildStarsConfig()
    if with_refcat:
        config = BuildStarsConfig(fgcmLoadReferenceCatalog=RefcatLoadConfig(
            path=str(repo / "refcat"), filterMap=dict(SIM_FILTERS)))
    with StarStore.open(tmp_path / "state", config) as store:
        attach_references(store, open_reference_source(config.fgcmLoadReferenceCatalog))
        report = backfill(repo, store, progress=False)
        assert report.ok, report.failed
        write_store_snapshot(store, tmp_path / "snapshot")
    return snapshot_digest(tmp_path / "snapshot")


@pytest.mark.parametrize("name", sorted(SURVEYS))
def test_catalogs_equal_those_of_earlier_code(name: str, tmp_path: Path) -> None:
    actual = _build(name, tmp_path)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("STREAMSTARS_UPDATE_GOLDEN") == "1":
        golden[name] = actual
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"golden digests of {name} written to {GOLDEN}")
    assert name in golden, f"no golden digests for {name}: run with STREAMSTARS_UPDATE_GOLDEN=1"
    assert digest_differences(golden[name], actual) == []
