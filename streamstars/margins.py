"""The margin completeness check of a sky shard (docs/sharding.md, "What the margin must cover").

A shard decides the stars of its core from the observations it stores: those of its core and
those within ``shardMargin`` outside it.  The decision about a star in the core depends on a
*chain* of observations around it: its own friends-of-friends component, the other stars
within ``isolationRadius`` (isolation), the earlier-band candidates within ``matchRadius`` of
each of those (the cross-band merge, one ``matchRadius`` per primary band) and the
observations within ``matchRadius`` (membership).  That chain reaches
:func:`chain_reach_arcsec` beyond the core.

The margin holds every observation within ``shardMargin`` of the core (the routing of
:mod:`streamstars.shards`), so a stored observation is *safe* — every observation within
``matchRadius`` of it is stored too — when it lies within ``shardMargin - matchRadius`` of the
core.  A friends-of-friends component (of a primary band, over the stored observations) with
an observation that is not safe may miss members the shard does not store: it is
*incomplete*.  An incomplete component that comes within the chain's reach of the core may
change a star the shard publishes: that is a **violation**, counted and reported with the
shard and the position, never published silently.  It needs a chain of observations each
within ``matchRadius`` of the next from the core's surroundings to the margin's outer edge:
a pathological friends-of-friends chain in an extremely crowded field.

Only margin observations are examined: a chain from the core to the outer edge crosses the
margin, and its margin part already joins an observation within the reach to one that is not
safe.  Distances come from :func:`streamstars.shards.touches`, conservatively: an observation
is called safe only when it surely is, and near the core whenever it may be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from streamstars.association.fof import fof_labels
from streamstars.columns import ColumnDict
from streamstars.config import BuildStarsConfig
from streamstars.shards import RIM_SLACK_ARCSEC, touches
from streamstars.sky import chord_from_arcsec, fixed_unit_vectors, pixels_of, vectors_from_fixed


@dataclass(frozen=True)
class MarginViolation:
    """An incomplete component within the decision chain's reach of a shard's core.

    ``ra``/``dec`` [deg] is its observation closest to the core (the first of those that may
    lie within the reach), ``members`` its stored observations.
    """

    order: int
    pixel: int
    band: str
    ra: float
    dec: float
    members: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``SNAPSHOT.json``, ``status``)."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the log."""
        return (f"shard {self.order}/{self.pixel}: a band-{self.band} friends-of-friends chain "
                f"of {self.members} stored observations reaches from near the core "
                f"(ra {self.ra:.6f}, dec {self.dec:.6f}) to the margin's outer edge; stars "
                "near it may differ from an unsharded build (raise shardMargin)")


def chain_reach_arcsec(config: BuildStarsConfig) -> float:
    """How far beyond the core the decision about a core star may look [arcsec]:
    ``isolationRadius + (len(primaryBands) + 1) * matchRadius``."""
    return config.isolationRadius + (len(config.primaryBands) + 1) * config.matchRadius


def margin_violations(observations: ColumnDict, band_code: np.ndarray, band_names: list[str],
                      order: int, pixel: int, margin_arcsec: float,
                      config: BuildStarsConfig) -> list[MarginViolation]:
    """The violations of shard ``pixel`` (at ``order``), from every observation it stores.

    Args:
        observations: ``ra``, ``dec`` [deg] of the stored observations (any band).
        band_code: index into ``band_names`` of each observation's band.
        band_names: the band names.
        order: log2 of ``shardNside``.
        pixel: the shard's nest pixel.
        margin_arcsec: the store's ``shardMargin``.
        config: the association settings (``matchRadius``, ``isolationRadius``,
            ``primaryBands``).

    Returns:
        One violation per incomplete component within reach, ordered by band then position.
    """
    nside = 1 << order
    v = vectors_from_fixed(fixed_unit_vectors(observations["ra"], observations["dec"]))
    margin_rows = np.flatnonzero(pixels_of(v, nside) != pixel)
    if not len(margin_rows):
        return []
    shard = np.full(len(margin_rows), pixel, dtype=np.int64)
    safe = touches(v[margin_rows], shard, nside, margin_arcsec - config.matchRadius)
    if safe.all():
        return []
    near = touches(v[margin_rows], shard, nside, chain_reach_arcsec(config) + RIM_SLACK_ARCSEC)
    radius = chord_from_arcsec(config.matchRadius)
    found = []
    for band in config.primaryBands:
        if band not in band_names:
            continue
        rows = np.flatnonzero(band_code[margin_rows] == band_names.index(band))
        if not len(rows) or safe[rows].all():
            continue
        labels = fof_labels(v[margin_rows[rows]], radius)
        incomplete = np.zeros(labels.max() + 1, dtype=bool)
        incomplete[labels[~safe[rows]]] = True
        close = near[rows] & incomplete[labels]
        sizes = np.bincount(labels)
        _, first = np.unique(labels[close], return_index=True)
        for row in np.flatnonzero(close)[first].tolist():
            obs_row = margin_rows[rows[row]]
            found.append(MarginViolation(order, pixel, band,
                                         float(observations["ra"][obs_row]),
                                         float(observations["dec"][obs_row]),
                                         int(sizes[labels[row]])))
    return found
