"""Links between a visit's new observations and the stored components, and the groups they
form (pure functions, no store).

A *link* joins a new observation to a component it may be within ``matchRadius`` of.  From the
component's centre and its bound ``rmax`` the triangle inequality sorts each pair into *surely
within the radius of every member* (a sure link), *surely none* (no link) or *unsure*; unsure
links to tracked components are then settled from their members' distances
(:func:`settle_links`).  New observations linked to each other and to components form
connected *groups*, and each group takes one update path (:func:`link_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from streamstars.association.fof import EPS, labels_from_edges
from streamstars.sky import pairs_within


@dataclass
class Links:
    """Links new observation -> component: parallel arrays, one entry per link."""

    new: np.ndarray  # int64, index of the new observation
    comp: np.ndarray  # int64, index of the component
    sure: np.ndarray  # bool, surely within the radius of every member

    @classmethod
    def none(cls) -> Links:
        """No links."""
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                   np.zeros(0, dtype=bool))

    def without(self, drop: np.ndarray) -> Links:
        """These links but those where ``drop`` (bool per link) is set."""
        keep = ~drop
        return Links(self.new[keep], self.comp[keep], self.sure[keep])


def bound_links(centres: np.ndarray, rmax: np.ndarray, tree_new: cKDTree,
                radius: float) -> Links:
    """Every link that is not surely out of reach, from the components' bounds.

    Args:
        centres: unit-vector centres (m, 3) of the components.
        rmax: their chord bounds of the member distance from the centre.
        tree_new: k-d tree of the new observations' unit vectors (the centres are looked up
            in it: no second tree is built).
        radius: the chord radius.

    Returns:
        Links with ``d - rmax <= radius + EPS``; sure when ``d + rmax <= radius - EPS``.
    """
    if len(centres) == 0:
        return Links.none()
    reach = radius + float(rmax.max()) + EPS
    link_comp, link_new, dist = pairs_within(centres, tree_new, reach)
    r = rmax[link_comp]
    keep = dist - r <= radius + EPS
    link_new, link_comp, dist, r = link_new[keep], link_comp[keep], dist[keep], r[keep]
    return Links(link_new, link_comp, dist + r <= radius - EPS)


def member_distances(points: np.ndarray, member_v: np.ndarray, start: np.ndarray,
                     count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance of every point to every member of its component.

    Point ``i``'s members are ``member_v[start[i]:start[i] + count[i]]``.  Returns (point
    index, member index, chord distance), one entry per pair, grouped by point.
    """
    pair_point = np.repeat(np.arange(len(points)), count)
    pair_start = np.concatenate([[0], np.cumsum(count)[:-1]])
    pair_member = np.arange(int(count.sum())) + np.repeat(start - pair_start, count)
    offsets = member_v[pair_member] - points[pair_point]
    return pair_point, pair_member, np.sqrt(np.einsum("ij,ij->i", offsets, offsets))


def settle_links(links: Links, check: np.ndarray, dist: np.ndarray, counts: np.ndarray,
                 radius: float) -> Links:
    """Decide the unsure links ``check`` from the distances to their component's members.

    Args:
        links: all links.
        check: indices of the links to settle.
        dist: for each checked link in turn, the distances of its observation to every
            member of its component (``counts[k]`` of them for link ``check[k]``).
        counts: members per checked link.
        radius: the chord radius.

    Returns:
        The links where no member is within reach dropped, and those with every member
        within reach made sure — the same predicate as the exact FoF (k-d tree pairs within
        the radius) with a margin of ``EPS``; the others stay unsure (a real partial link).
    """
    pair_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nearest = np.minimum.reduceat(dist, pair_starts)
    farthest = np.maximum.reduceat(dist, pair_starts)
    none = nearest > radius + EPS
    all_within = farthest <= radius - EPS
    sure = links.sure.copy()
    sure[check[all_within]] = True
    drop = np.zeros(len(links.new), dtype=bool)
    drop[check[none]] = True
    return Links(links.new, links.comp, sure).without(drop)


@dataclass
class LinkGroups:
    """How each new observation of a visit is folded in (see :func:`link_groups`)."""

    lone: np.ndarray  # bool per new observation: linked to nothing -> singleton component
    join: np.ndarray  # bool: its group keeps one clique a clique
    extend: np.ndarray  # bool: its group touches exactly one tracked component (in order)
    comp_of_obs: np.ndarray  # the one component of its group (-1 if none or several)


def link_groups(n_new: int, new_pairs: np.ndarray, links: Links, clique: np.ndarray,
                tracked: np.ndarray) -> LinkGroups:
    """Connected groups of new observations and the components they link to.

    Args:
        n_new: number of new observations.
        new_pairs: (k, 2) pairs of new observations within the radius of each other.
        links: the settled links.
        clique, tracked: per component, its clique flag and whether its member list is kept.

    Returns:
        Per new observation, its group's path.  A group of new observations linked to
        exactly one clique, every observation surely within reach of every member (one sure
        link) and of every other observation of the group, keeps it a clique (*join*).  Any
        other group linked to exactly one *tracked* component may extend it from its member
        list (*extend*; checked further by the in-order path).  A single observation linked
        to nothing is *lone*.  Everything else is resolved exactly.
    """
    n_comp = len(clique)
    edges = np.concatenate([new_pairs, np.stack([links.new, n_new + links.comp], axis=1)])
    label = labels_from_edges(n_new + n_comp, edges.astype(np.int64))
    n_groups = int(label.max()) + 1
    g_new = label[:n_new]
    linked = np.bincount(links.comp, minlength=n_comp) > 0
    g_comp = label[n_new:][linked]
    new_in = np.bincount(g_new, minlength=n_groups)
    comps_in = np.bincount(g_comp, minlength=n_groups)
    comp_of_group = np.full(n_groups, -1, dtype=np.int64)
    comp_of_group[g_comp] = np.flatnonzero(linked)
    comp_of_group[comps_in != 1] = -1
    pairs_in = np.bincount(g_new[new_pairs[:, 0]], minlength=n_groups) if len(new_pairs) \
        else np.zeros(n_groups, dtype=np.int64)
    n_links = np.bincount(links.new, minlength=n_new)
    not_sure = (n_links != 1) | (np.bincount(links.new[~links.sure], minlength=n_new) > 0)
    all_sure = np.bincount(g_new[not_sure], minlength=n_groups) == 0
    one = comp_of_group >= 0
    target = comp_of_group[one]
    join_g, extend_g = np.zeros(n_groups, dtype=bool), np.zeros(n_groups, dtype=bool)
    join_g[one] = clique[target] & all_sure[one] & (
        pairs_in[one] == new_in[one] * (new_in[one] - 1) // 2)
    extend_g[one] = ~join_g[one] & tracked[target]
    lone_g = (new_in == 1) & (comps_in == 0)
    return LinkGroups(lone=lone_g[g_new], join=join_g[g_new], extend=extend_g[g_new],
                      comp_of_obs=comp_of_group[g_new])
