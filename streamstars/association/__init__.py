"""Incremental association with fgcm's seeding semantics (docs/association.md).

fgcm seeds stars per primary band greedily: in canonical order (visit, sourceId) an
observation that is not yet covered and has >= ``minPerBand`` same-band observations within
``matchRadius`` (itself included) seeds a candidate at the mean of that group and covers it.
That greedy decomposes exactly over the 1" friends-of-friends (FoF) *components* of a band's
observations, and a component whose members are pairwise within 1" (a *clique*) yields exactly
one candidate: the mean of all members, seeded by its earliest member.  Components only grow or
merge when observations arrive, so the store keeps, per primary band, one record per component
(keyed by the HEALPix pixel of its centre): member count, exact integer vector sums, an upper
bound ``rmax`` on the member distance from the centre, the clique flag and the seed.  Non-clique
components (close pairs, deblend duplicates, chains: rare) also keep the candidates of their
replayed greedy.

Modules:

* pure functions (no store): :mod:`.fof` (components and their exact summaries),
  :mod:`.greedy` (fgcm's greedy replayed and extended), :mod:`.links` (links of new
  observations to components, the groups they form), :mod:`.join` (the vectorised join);
* the update paths, through a :class:`~.context.BandContext` (transaction + band):
  :mod:`.update` (:func:`add_observations`: lone / join / in order / exact, write-back),
  :mod:`.in_order`, :mod:`.exact`, :mod:`.members`, and :mod:`.removal`
  (:func:`rebuild_after_removal`).

Candidates, cross-band merging, isolation, membership, requiredBands and the density cut are
derived from the components at snapshot time (:mod:`streamstars.snapshot`).
"""

from streamstars.association.context import BandUpdateStats
from streamstars.association.removal import rebuild_after_removal
from streamstars.association.update import add_observations

__all__ = ["BandUpdateStats", "add_observations", "rebuild_after_removal"]
