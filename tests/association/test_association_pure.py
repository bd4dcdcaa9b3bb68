"""The pure functions of the association, on small hand-made inputs (no store).

Positions are given as offsets in arcsec from a point on the equator (where an arcsec of RA is
an arcsec on the sky); the match radius is 1".  fgcm's greedy seeding is reimplemented here
literally (every observation against every other) and compared with the per-component replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from streamstars.association.fof import (
    EPS,
    centres_of,
    fof_labels,
    labels_from_edges,
    match_chord,
    summarize_pieces,
)
from streamstars.association.greedy import extend_seeds
from streamstars.association.join import join_cliques
from streamstars.association.links import (
    Links,
    bound_links,
    link_groups,
    member_distances,
    settle_links,
)
from streamstars.columns import ColumnDict
from streamstars.sky import fixed_unit_vectors, kdtree, normalized, vectors_from_fixed

RADIUS = match_chord(1.0)
RA0 = 10.0


def fixed_at(offsets: Sequence[tuple[float, float]]) -> np.ndarray:
    """Fixed-point unit vectors of points (dx, dy) arcsec from (RA0, 0)."""
    xy = np.asarray(offsets, dtype=np.float64).reshape(-1, 2)
    return fixed_unit_vectors(RA0 + xy[:, 0] / 3600.0, xy[:, 1] / 3600.0)


def summarize(offsets: Sequence[tuple[float, float]], visit: list[int], source_id: list[int],
              min_per_band: int) -> tuple[ColumnDict, ColumnDict]:
    """Components and non-clique candidates of the FoF pieces of the points."""
    fixed = fixed_at(offsets)
    labels = fof_labels(vectors_from_fixed(fixed), RADIUS)
    return summarize_pieces(np.asarray(visit, np.int64), np.asarray(source_id, np.int64), fixed,
                            labels, RADIUS, min_per_band)


def all_candidates(comps: ColumnDict, cands: ColumnDict, min_per_band: int) -> list[tuple]:
    """Every star candidate as the snapshot derives them: a clique with enough members is one
    (implicit), a non-clique contributes its replayed candidates.  Sorted tuples of
    (star id, count, sums, seed visit, seed sourceId)."""
    out = []
    implicit = comps["clique"] & (comps["count"] >= min_per_band)
    for i in np.flatnonzero(implicit).tolist():
        out.append((int(comps["comp_id"][i]), int(comps["count"][i]),
                    (int(comps["sx"][i]), int(comps["sy"][i]), int(comps["sz"][i])),
                    int(comps["seed_visit"][i]), int(comps["seed_src"][i])))
    for i in range(len(cands["star_id"])):
        out.append((int(cands["star_id"][i]), int(cands["count"][i]),
                    (int(cands["sx"][i]), int(cands["sy"][i]), int(cands["sz"][i])),
                    int(cands["seed_visit"][i]), int(cands["seed_src"][i])))
    return sorted(out)


def brute_force_greedy(visit: np.ndarray, source_id: np.ndarray, fixed: np.ndarray,
                       min_per_band: int) -> list[tuple]:
    """fgcm's seeding, literally: in (visit, sourceId) order an observation not yet covered
    with >= minPerBand observations within the radius (itself included, covered or not)
    seeds a candidate of all of them and covers them."""
    v = vectors_from_fixed(fixed)
    near = np.sqrt(((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=-1)) <= RADIUS
    covered = np.zeros(len(visit), dtype=bool)
    out = []
    for i in sorted(range(len(visit)), key=lambda k: (visit[k], source_id[k])):
        group = np.flatnonzero(near[i])
        if covered[i] or len(group) < min_per_band:
            continue
        covered[group] = True
        total = fixed[group].sum(axis=0)
        out.append((int(source_id[group].min()), len(group),
                    (int(total[0]), int(total[1]), int(total[2])), int(visit[i]),
                    int(source_id[i])))
    return sorted(out)


# --------------------------------------------------------------------------- components
def test_labels_join_chains_and_keep_separate_groups_apart() -> None:
    # a chain a-b-c (a and c 1.6" apart), a separate pair d-e, a lone f
    points = [(0, 0), (0.8, 0), (1.6, 0), (10, 0), (10.5, 0), (20, 0)]
    labels = fof_labels(vectors_from_fixed(fixed_at(points)), RADIUS)
    assert labels[0] == labels[1] == labels[2]
    assert labels[3] == labels[4] != labels[0]
    assert len(set(labels.tolist())) == 3
    assert sorted(set(labels.tolist())) == [0, 1, 2]  # labels are 0..k-1
    assert fof_labels(np.zeros((0, 3)), RADIUS).tolist() == []
    edges = np.array([[0, 1], [3, 2]], dtype=np.int64)
    np.testing.assert_array_equal(labels_from_edges(5, edges), [0, 0, 1, 1, 2])
    assert labels_from_edges(0, np.zeros((0, 2), dtype=np.int64)).tolist() == []


def test_a_pair_is_one_clique_seeded_by_its_earliest_member() -> None:
    # the later visit holds the smaller sourceId: the id is the smallest sourceId, the seed
    # the earliest in canonical (visit, sourceId) order
    comps, cands = summarize([(0, 0), (0.5, 0.2)], visit=[2, 1], source_id=[5, 9],
                             min_per_band=2)
    assert comps["comp_id"].tolist() == [5]
    assert comps["count"].tolist() == [2]
    assert comps["clique"].tolist() == [True]
    assert (comps["seed_visit"][0], comps["seed_src"][0]) == (1, 9)
    assert not comps["tracked"].any()
    assert len(cands["comp_id"]) == 0  # a clique's candidate is implicit
    fixed = fixed_at([(0, 0), (0.5, 0.2)])
    assert (comps["sx"][0], comps["sy"][0], comps["sz"][0]) == tuple(fixed.sum(axis=0))


def test_a_clique_records_exact_sums_and_a_true_bound_of_its_radius() -> None:
    points = [(0, 0), (0.6, 0), (0, 0.6), (0.5, 0.5)]
    fixed = fixed_at(points)
    comps, cands = summarize(points, visit=[1, 1, 2, 3], source_id=[40, 30, 20, 10],
                             min_per_band=2)
    assert comps["clique"].tolist() == [True] and comps["count"].tolist() == [4]
    assert comps["comp_id"].tolist() == [10]
    assert (comps["seed_visit"][0], comps["seed_src"][0]) == (1, 30)  # tie in visit 1
    centre = centres_of(comps)[0]
    np.testing.assert_array_equal(centre, normalized(fixed.sum(axis=0)[None, :])[0])
    distances = np.linalg.norm(vectors_from_fixed(fixed) - centre, axis=1)
    assert distances.max() <= comps["rmax"][0] <= distances.max() + 2 * EPS
    assert len(cands["comp_id"]) == 0


def test_exact_duplicates_are_one_clique() -> None:
    """Two observations at the very same position (a deblend duplicate) and a third near."""
    comps, cands = summarize([(0, 0), (0, 0), (0.3, 0)], visit=[1, 1, 2], source_id=[7, 3, 5],
                             min_per_band=2)
    assert comps["count"].tolist() == [3] and comps["clique"].tolist() == [True]
    assert comps["comp_id"].tolist() == [3]
    assert (comps["seed_visit"][0], comps["seed_src"][0]) == (1, 3)
    assert len(cands["comp_id"]) == 0


@pytest.mark.parametrize(("min_per_band", "expected"), [
    # a seeds {a, b}; c is uncovered with neighbours {b, c}: it seeds {b, c}, b counted again
    (1, [(1, 2, 1, 1), (2, 2, 3, 3)]),
    (2, [(1, 2, 1, 1), (2, 2, 3, 3)]),
    # a has only 2 within the radius; b has all 3: one candidate of a, b, c seeded by b
    (3, [(1, 3, 2, 2)]),
])
def test_a_chain_is_not_a_clique_and_replays_the_greedy(
        min_per_band: int, expected: list[tuple[int, int, int, int]]) -> None:
    points = [(0, 0), (0.8, 0), (1.6, 0)]  # a, b, c: ends 1.6" apart
    comps, cands = summarize(points, visit=[1, 2, 3], source_id=[1, 2, 3],
                             min_per_band=min_per_band)
    assert comps["count"].tolist() == [3] and comps["clique"].tolist() == [False]
    got = [(int(s), int(n), int(v), int(src)) for s, n, v, src in zip(
        cands["star_id"], cands["count"], cands["seed_visit"], cands["seed_src"], strict=True)]
    assert sorted(got) == expected
    assert set(cands["comp_id"].tolist()) <= {1}


def test_min_per_band_decides_which_singletons_and_pairs_make_candidates() -> None:
    points = [(0, 0), (20, 0), (20.4, 0), (40, 0), (40.3, 0), (40.1, 0.3)]
    visit, source_id = [1, 1, 2, 1, 2, 3], [1, 2, 3, 4, 5, 6]
    for min_per_band, stars in ((1, [1, 2, 4]), (2, [2, 4]), (3, [4])):
        comps, cands = summarize(points, visit, source_id, min_per_band)
        found = all_candidates(comps, cands, min_per_band)
        assert [c[0] for c in found] == stars
        fixed = fixed_at(points)
        assert found == brute_force_greedy(np.array(visit), np.array(source_id), fixed,
                                           min_per_band)


def test_canonical_order_breaks_ties_by_sourceid_within_a_visit() -> None:
    """In one visit the smaller sourceId seeds first, whatever the row order: the middle of
    a chain seeds all three; an end seeds its pair, and the other end then seeds its own."""
    points = [(0.8, 0), (0, 0), (1.6, 0)]  # rows: middle, end, end
    comps, cands = summarize(points, visit=[5, 5, 5], source_id=[11, 12, 13], min_per_band=2)
    assert comps["seed_src"].tolist() == [11]
    assert cands["seed_src"].tolist() == [11] and cands["count"].tolist() == [3]
    comps, cands = summarize(points, visit=[5, 5, 5], source_id=[12, 11, 13], min_per_band=2)
    assert comps["seed_src"].tolist() == [11]
    assert cands["seed_src"].tolist() == [11, 13] and cands["count"].tolist() == [2, 2]
    assert cands["star_id"].tolist() == [11, 12]


def test_known_nonclique_pieces_skip_their_neighbour_counts_with_the_same_result() -> None:
    points = [(0, 0), (0.8, 0), (1.6, 0), (9, 0), (9.2, 0)]
    fixed = fixed_at(points)
    visit, source_id = np.array([3, 1, 2, 1, 1]), np.array([1, 2, 3, 4, 5])
    labels = fof_labels(vectors_from_fixed(fixed), RADIUS)
    plain = summarize_pieces(visit, source_id, fixed, labels, RADIUS, 2)
    known = ~plain[0]["clique"]
    hinted = summarize_pieces(visit, source_id, fixed, labels, RADIUS, 2, known)
    for a, b in zip(plain, hinted, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("min_per_band", [1, 2, 3])
def test_replay_equals_fgcm_greedy_on_random_fields(min_per_band: int) -> None:
    """The greedy decomposes over FoF components: implicit clique candidates plus replayed
    non-clique ones are exactly the candidates of fgcm's greedy over all observations."""
    rng = np.random.default_rng(100 + min_per_band)
    nontrivial = 0
    for _ in range(300):
        n = int(rng.integers(1, 25))
        xy = rng.uniform(0, 4.0, size=(n, 2))
        dup = rng.random(n) < 0.1  # exact duplicates of the previous point
        xy[1:][dup[1:]] = xy[:-1][dup[1:]]
        visit = rng.integers(1, 5, size=n).astype(np.int64)  # ties in visit are common
        source_id = rng.permutation(np.arange(1000, 1000 + 3 * n))[:n].astype(np.int64)
        fixed = fixed_at([tuple(p) for p in xy])
        labels = fof_labels(vectors_from_fixed(fixed), RADIUS)
        comps, cands = summarize_pieces(visit, source_id, fixed, labels, RADIUS, min_per_band)
        nontrivial += int((~comps["clique"]).sum())
        assert all_candidates(comps, cands, min_per_band) == brute_force_greedy(
            visit, source_id, fixed, min_per_band)
        # every candidate belongs to a component of its piece; ids are smallest sourceIds
        assert set(cands["comp_id"].tolist()) <= set(comps["comp_id"][~comps["clique"]].tolist())
        for label, comp_id in enumerate(comps["comp_id"].tolist()):
            assert comp_id == source_id[labels == label].min()
    assert nontrivial > 100  # the fields really hold chains and close pairs


def test_extend_seeds_follows_canonical_order_and_covers_neighbours() -> None:
    covered = np.zeros(4, dtype=bool)
    potential = np.array([0, 1, 2, 3])
    visit = np.array([2, 1, 1, 3])
    source_id = np.array([5, 9, 4, 1])
    neighbours = {1: [2], 2: [1], 0: [3], 3: [0]}
    seeds = extend_seeds(potential, covered, (source_id, visit), neighbours)
    # order: (1, 4) -> row 2 first; it covers row 1; then (2, 5) -> row 0, covering row 3
    assert [(r, sorted(near.tolist())) for r, near in seeds] == [(2, [1, 2]), (0, [0, 3])]
    assert covered.all()


# --------------------------------------------------------------------------- links
def test_bound_links_sort_pairs_into_sure_unsure_and_none() -> None:
    centre = vectors_from_fixed(fixed_at([(0, 0)]))
    rmax = np.array([match_chord(0.3)])
    new = vectors_from_fixed(fixed_at([(0.5, 0), (1.0, 0), (1.5, 0), (3, 0)]))
    links = bound_links(centre, rmax, kdtree(new), RADIUS)
    found = dict(zip(links.new.tolist(), links.sure.tolist(), strict=True))
    # d + rmax <= R: sure; d - rmax <= R < d + rmax: unsure; d - rmax > R: no link
    assert found == {0: True, 1: False}
    assert bound_links(np.zeros((0, 3)), np.zeros(0), kdtree(new), RADIUS).new.tolist() == []


def test_member_distances_pair_each_point_with_its_component_members() -> None:
    members = vectors_from_fixed(fixed_at([(0, 0), (0.5, 0), (5, 0), (5, 0.5), (5, 1)]))
    points = vectors_from_fixed(fixed_at([(0.2, 0), (5, 0.2)]))
    start, count = np.array([0, 2]), np.array([2, 3])
    point, member, dist = member_distances(points, members, start, count)
    assert point.tolist() == [0, 0, 1, 1, 1]
    assert member.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(dist, np.linalg.norm(members[member] - points[point], axis=1))


def test_settle_links_drops_far_links_and_makes_close_ones_sure() -> None:
    links = Links(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1]),
                  np.array([False, False, False, True]))
    check = np.array([0, 1, 2])
    # link 0: every member within; link 1: none within; link 2: one in, one out
    dist = np.array([0.2, 0.9, 1.5, 2.0, 0.5, 1.5]) * RADIUS
    settled = settle_links(links, check, dist, np.array([2, 2, 2]), RADIUS)
    assert settled.new.tolist() == [0, 2, 3]
    assert settled.sure.tolist() == [True, False, True]


def test_link_groups_choose_each_group_s_path() -> None:
    # components: 0 a clique, 1 a tracked non-clique, 2 an untracked clique, 3 another clique
    clique = np.array([True, False, True, True])
    tracked = np.array([False, True, False, False])
    # new observations: 0 and 1 join clique 0 (sure, pairwise close); 2 extends tracked 1;
    # 3 links unsure to clique 2 and 5 to cliques 2 and 3 (one group: exact); 4 is alone
    new_pairs = np.array([[0, 1]])
    links = Links(np.array([0, 1, 2, 3, 5, 5]), np.array([0, 0, 1, 2, 2, 3]),
                  np.array([True, True, False, False, True, True]))
    groups = link_groups(6, new_pairs, links, clique, tracked)
    assert groups.join.tolist() == [True, True, False, False, False, False]
    assert groups.extend.tolist() == [False, False, True, False, False, False]
    assert groups.lone.tolist() == [False, False, False, False, True, False]
    # observation 3 and 5 are one group with two components: no single component
    assert groups.comp_of_obs.tolist() == [0, 0, 1, -1, -1, -1]


def test_a_group_not_pairwise_close_does_not_join() -> None:
    clique, tracked = np.array([True]), np.array([False])
    links = Links(np.array([0, 1]), np.array([0, 0]), np.array([True, True]))
    far_apart = link_groups(2, np.zeros((0, 2), dtype=np.int64), links, clique, tracked)
    assert not far_apart.join.any() and not far_apart.extend.any()
    assert far_apart.comp_of_obs.tolist() == [0, 0]


# --------------------------------------------------------------------------- join
def test_join_keeps_sums_exact_and_updates_seed_and_id() -> None:
    old = fixed_at([(0, 0), (0.2, 0)])
    comps, _ = summarize_pieces(np.array([3, 3]), np.array([50, 60]), old, np.array([0, 0]),
                                RADIUS, 2)
    centres = centres_of(comps)
    new = fixed_at([(0.1, 0.1), (0.1, -0.1)])
    changed = join_cliques(comps, centres, np.array([0, 0]), np.array([70, 40]),
                           np.array([2, 4]), new, vectors_from_fixed(new))
    assert changed.tolist() == [0]
    assert comps["count"].tolist() == [4]
    total = old.sum(axis=0) + new.sum(axis=0)
    assert (comps["sx"][0], comps["sy"][0], comps["sz"][0]) == tuple(total)
    assert comps["comp_id"].tolist() == [40]  # the smallest sourceId
    assert (comps["seed_visit"][0], comps["seed_src"][0]) == (2, 70)  # visit 2 precedes 3
    all_v = vectors_from_fixed(np.concatenate([old, new]))
    np.testing.assert_array_equal(centres[0], centres_of(comps)[0])
    assert np.linalg.norm(all_v - centres[0], axis=1).max() <= comps["rmax"][0]
