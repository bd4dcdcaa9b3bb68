"""Member lists of tracked components: appending, replacing, forgetting (through the store's
``members`` table, which goes through the writer's cache)."""

from __future__ import annotations

import numpy as np

from streamstars.association.context import BandContext
from streamstars.sky import vectors_from_fixed


def member_vectors(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point (n, 3) and unit vectors of member rows (``MEMBER_DTYPE``)."""
    fixed = np.stack([members["x"], members["y"], members["z"]], axis=1)
    return fixed, vectors_from_fixed(fixed)


def append_members(ctx: BandContext, old_ids: np.ndarray, new_ids: np.ndarray,
                   owner: np.ndarray, rows: np.ndarray) -> None:
    """Append ``rows`` (``MEMBER_DTYPE``) to the member lists of the tracked components
    ``owner`` (indices into ``old_ids``/``new_ids``: the component id before and after the
    update)."""
    order = np.argsort(owner, kind="stable")
    owner, rows = owner[order], rows[order]
    bounds = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1], True])
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        ctx.tx.members.append(ctx.band, int(old_ids[owner[lo]]), int(new_ids[owner[lo]]),
                              rows[lo:hi].tobytes())


def write_member_lists(ctx: BandContext, comp_ids: np.ndarray, rows: np.ndarray,
                       piece: np.ndarray) -> None:
    """Store the member list of each component ``comp_ids[k]``: the ``rows`` whose ``piece``
    is ``k`` (in the order given)."""
    order = np.argsort(piece, kind="stable")
    bounds = np.searchsorted(piece[order], np.arange(len(comp_ids) + 1))
    for k, comp_id in enumerate(comp_ids.tolist()):
        ctx.tx.members.put(ctx.band, comp_id, rows[order[bounds[k]:bounds[k + 1]]].tobytes())


def forget_members(ctx: BandContext, comp_ids: np.ndarray) -> None:
    """Forget the member lists of (tracked) components that no longer exist."""
    for c in comp_ids.tolist():
        ctx.tx.members.delete(ctx.band, c)
