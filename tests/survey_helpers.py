"""Helpers shared by the association / store tests: simulate, prepare, ingest in an order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamstars.columns import OBSERVATION_DTYPES
from streamstars.config import BuildStarsConfig
from streamstars.ingest import PreparedVisit, VisitInput, apply_prepared, prepare_visit
from streamstars.io.discover import discover_repo
from streamstars.simulate import simulate_survey
from streamstars.snapshot import StarCatalog, build_catalogs
from streamstars.state.store import StarStore


@dataclass
class PreparedSurvey:
    repo: Path
    visits: list[PreparedVisit]
    config: BuildStarsConfig


def prepare_survey(out: Path, config: BuildStarsConfig, **simulate_args: object) -> PreparedSurvey:
    """Simulate a survey, discover it and prepare (read + select) every visit once."""
    simulate_survey(out, **simulate_args)  # type: ignore[arg-type]
    inventory = discover_repo(out, reference_ccd=config.referenceCCD)
    prepared = [
        prepare_visit(VisitInput(v.visit, v.source_paths, v.metadata), config)  # type: ignore[arg-type]
        for _, v in sorted(inventory.visits.items())
    ]
    return PreparedSurvey(out, prepared, config)


def ingest(state: Path, survey: PreparedSurvey, order: Sequence[int]) -> StarCatalog:
    """Apply the survey's visits in ``order`` (indices) to a new store; return its stars."""
    with StarStore.open(state, survey.config) as store:
        for index in order:
            apply_prepared(store, survey.visits[index])
        with store.read() as txn:
            _, stars = build_catalogs(store, txn)
    return stars


def all_observations(visits: Sequence[PreparedVisit]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every selected observation of the visits and the band of each."""
    obs = {k: np.concatenate([v.observations[k] for v in visits]) for k in OBSERVATION_DTYPES}
    bands = np.concatenate([np.full(len(v.observations["source_id"]), v.band, dtype=object)
                            for v in visits])
    return obs, bands


def assert_same_stars(a: StarCatalog, b: StarCatalog) -> None:
    """Bit-identical star catalogs: ids, positions, memberships, observation rows."""
    np.testing.assert_array_equal(a.star_id, b.star_id)
    np.testing.assert_array_equal(a.ra, b.ra)
    np.testing.assert_array_equal(a.dec, b.dec)
    np.testing.assert_array_equal(a.n_obs, b.n_obs)
    np.testing.assert_array_equal(a.obj_flag, b.obj_flag)
    for name in OBSERVATION_DTYPES:
        np.testing.assert_array_equal(a.observations[name], b.observations[name], err_msg=name)


def members_of(stars: StarCatalog) -> dict[int, np.ndarray]:
    """star id -> sorted member sourceIds."""
    starts = np.concatenate([[0], np.cumsum(stars.n_obs)[:-1]]).astype(np.int64)
    return {int(i): np.sort(stars.observations["source_id"][s:s + n])
            for i, s, n in zip(stars.star_id, starts, stars.n_obs, strict=True)}
