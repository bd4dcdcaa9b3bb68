"""Shard routing: every shard within the margin of an observation stores it."""

from __future__ import annotations

import healpy as hp
import numpy as np
import pytest

from streamstars.shards import RIM_SLACK_ARCSEC, rim_radius, route, touches
from streamstars.sky import ARCSEC_RAD, pixels_of, unit_vectors


def _near_borders(rng: np.random.Generator, nside: int, n_pixels: int, spread_arcsec: float
                  ) -> np.ndarray:
    """Points scattered within ``spread_arcsec`` of the borders and corners of random shards,
    plus the poles, RA 0/360 and base-pixel corners."""
    pixels = rng.integers(0, hp.nside2npix(nside), n_pixels)
    corners = np.asarray(hp.boundaries(nside, pixels, step=4, nest=True))  # (n, 3, 16)
    points = np.transpose(corners, (0, 2, 1)).reshape(-1, 3)
    extra = unit_vectors(np.array([0.0, 359.99999, 45.0, 0.0, 0.0, 90.0]),
                         np.array([0.0, 0.0, 41.8103149, 90.0, -90.0, -41.8103149]))
    points = np.concatenate([points, extra])
    return _scatter(rng, points, spread_arcsec)


def _scatter(rng: np.random.Generator, points: np.ndarray, spread_arcsec: float) -> np.ndarray:
    step = rng.uniform(0, spread_arcsec, len(points)) * ARCSEC_RAD
    noise = rng.normal(size=points.shape)
    noise -= np.einsum("ij,ij->i", noise, points)[:, None] * points
    noise /= np.linalg.norm(noise, axis=1)[:, None]
    moved = np.cos(step)[:, None] * points + np.sin(step)[:, None] * noise
    return moved / np.linalg.norm(moved, axis=1)[:, None]


def _shards_within(v: np.ndarray, nside: int, radius_arcsec: float) -> list[set[int]]:
    """Brute force: the shards of a dense filled disc of samples around each point."""
    radii = np.linspace(0.0, radius_arcsec, 21) * ARCSEC_RAD
    out = []
    for point in v:
        axis = np.array([1.0, 0.0, 0.0]) if abs(point[2]) > 0.9 else np.array([0.0, 0.0, 1.0])
        e1 = np.cross(axis, point)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(point, e1)
        angle = np.linspace(0, 2 * np.pi, 480, endpoint=False)
        d = np.cos(angle)[:, None] * e1 + np.sin(angle)[:, None] * e2
        samples = (np.cos(radii)[:, None, None] * point
                   + np.sin(radii)[:, None, None] * d[None]).reshape(-1, 3)
        out.append(set(pixels_of(samples, nside).tolist()))
    return out


@pytest.mark.parametrize("nside,margin", [(1, 10.0), (32, 10.0), (512, 6.5), (64, 30.0)])
def test_every_shard_within_the_margin_stores_the_observation(nside: int, margin: float) -> None:
    rng = np.random.default_rng(nside)
    v = _near_borders(rng, nside, 12, margin * 1.2)
    routing = route(v, nside, margin)
    stored: list[set[int]] = [set() for _ in range(len(v))]
    for row, shard in zip(routing.rows.tolist(), routing.shards.tolist(), strict=True):
        stored[row].add(shard)
    expected = _shards_within(v, nside, margin)
    for i, (want, got) in enumerate(zip(expected, stored, strict=True)):
        assert want <= got, f"point {i}: shards {sorted(want - got)} within {margin}\" missed"
    # and nothing farther than the rim radius: every stored shard touches the rim's disc
    reach = _shards_within(v, nside, rim_radius(margin) + 1e-3)
    for i, (bound, got) in enumerate(zip(reach, stored, strict=True)):
        assert got <= bound, f"point {i}: {sorted(got - bound)} stored from beyond the rim"
    # exactly one core entry per observation: its own pixel
    assert np.array_equal(routing.rows[routing.core], np.arange(len(v)))
    assert np.array_equal(routing.shards[routing.core], pixels_of(v, nside))


def test_points_far_from_borders_go_to_their_core_only() -> None:
    nside = 16
    centres = np.asarray(hp.pix2vec(nside, np.arange(0, 3072, 97), nest=True)).T
    routing = route(centres, nside, 10.0)
    assert routing.core.all()
    assert len(routing.rows) == len(centres)


def test_touches_is_sufficient_and_necessary_up_to_the_slack() -> None:
    rng = np.random.default_rng(4)
    nside, radius = 64, 8.0
    v = _near_borders(rng, nside, 10, 12.0)
    core = pixels_of(v, nside)
    neighbours = np.asarray(hp.get_all_neighbours(nside, core, nest=True))
    for k in range(8):
        shard = np.where(neighbours[k] >= 0, neighbours[k], core)
        got = touches(v, shard, nside, radius)
        sure = _shards_within(v, nside, radius - RIM_SLACK_ARCSEC)
        possible = _shards_within(v, nside, radius + 1e-3)
        for i in range(len(v)):
            if shard[i] in sure[i]:
                assert got[i], f"point {i} within {radius - RIM_SLACK_ARCSEC}\" not touched"
            if got[i]:
                assert shard[i] in possible[i], f"point {i} touched from beyond {radius}\""
