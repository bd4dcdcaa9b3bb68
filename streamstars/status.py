"""``streamstars status``: what a store or a state directory holds (each store read in one
read transaction)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from streamstars.margins import MarginViolation
from streamstars.select import DROP_REASONS
from streamstars.snapshot import ShardOwnership, check_shard_margin
from streamstars.state import StarStore, StateDirectory
from streamstars.state.index import META_CREATED as INDEX_META_CREATED
from streamstars.state.schema import FORMAT_VERSION, META_CREATED, META_REFCAT


def store_status(store: StarStore) -> dict[str, Any]:
    """Counts and settings of a store: visits per band, observations, components, offsets,
    rows the visits lost to unusable coordinates (``rows_dropped``, by reason)."""
    config = store.config
    visits_per_band: Counter[str] = Counter()
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    n_sources = n_selected = 0
    first = last = None
    with store.read() as tx:
        for visit, record in tx.visits.items():
            visits_per_band[record.band] += 1
            n_sources += int(record.n_sources)
            n_selected += int(record.n_selected)
            dropped.update(record.dropped)
            first = visit if first is None else first
            last = visit
        observation_values = tx.observations.count()
        components: Counter[str] = Counter()
        candidates: Counter[str] = Counter()
        for band, comps in tx.components.items():
            components[band] += len(comps["comp_id"])
            candidates[band] += int(np.count_nonzero(
                comps["clique"] & (comps["count"] >= config.minPerBand)))
        offsets = {f"{topic}/{partition}": offset
                   for topic, partition, offset in tx.offsets.items()}
        created = tx.meta.get(META_CREATED)
        refcat = tx.meta.get(META_REFCAT)
    return {
        "state": str(store.path),
        "format_version": FORMAT_VERSION,
        "created": created.decode() if created else None,
        "visits": sum(visits_per_band.values()),
        "visits_per_band": dict(sorted(visits_per_band.items())),
        "first_visit": first,
        "last_visit": last,
        "sources_read": n_sources,
        "observations": n_selected,
        "rows_dropped": dict(sorted(dropped.items())),
        "observation_records": observation_values,
        "components_per_band": dict(sorted(components.items())),
        "clique_candidates_per_band": dict(sorted(candidates.items())),
        "primary_bands": list(config.primaryBands),
        "kafka_offsets": offsets,
        "refcat": refcat.decode() if refcat else None,
        "map_size_bytes": store.map_size_bytes(),
        "used_bytes": store.used_bytes(),
    }


def state_status(state: StateDirectory, *, margins: bool = False) -> dict[str, Any]:
    """Counts and settings of a state directory: the totals over its visits (from the index),
    its shards, and per shard what it stores (``shard_counts``, keyed ``order/pixel``).

    ``observations`` counts each selected observation once; ``observations_stored`` counts
    the copies the shards hold (a row within ``shardMargin`` of a border is stored in every
    shard it is near), ``margin_fraction`` the share of stored rows that are margin copies.
    ``components_per_band`` and ``clique_candidates_per_band`` are summed over the shards (a
    component near a border is counted in each shard holding it).

    With ``margins``, every shard's margin completeness check runs (what a snapshot reports;
    it reads the positions of every stored observation): ``margin_violations`` is their
    number and ``margin_violation_examples`` the first ten, described.
    """
    config = state.config
    visits_per_band: Counter[str] = Counter()
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    n_sources = n_selected = 0
    first = last = None
    incomplete = []
    with state.index.read() as tx:
        for visit, record in tx.items():
            if record.status != "applied":
                incomplete.append(visit)
                continue
            visits_per_band[record.band] += 1
            n_sources += int(record.n_sources)
            n_selected += int(record.n_selected)
            dropped.update(record.dropped_rows)
            first = visit if first is None else first
            last = visit
        offsets = {f"{topic}/{partition}": offset for topic, partition, offset in tx.offsets()}
        created = tx.get_meta(INDEX_META_CREATED)
    components: Counter[str] = Counter()
    candidates: Counter[str] = Counter()
    per_shard: dict[str, dict[str, Any]] = {}
    stored = records = map_size = 0
    violations: list[MarginViolation] = []
    used = int((state.index.env.info()["last_pgno"] + 1) * state.index.env.stat()["psize"])
    for order, pixel in state.shards():
        store = state.open_shard(pixel)
        counts = _shard_counts(store, config.minPerBand, components, candidates)
        per_shard[f"{order}/{pixel}"] = counts
        stored += counts["observations_stored"]
        records += counts["observation_records"]
        map_size += store.map_size_bytes()
        used += counts["used_bytes"]
        if margins:
            with store.read(buffers=True) as tx:
                violations.extend(check_shard_margin(
                    tx, config, ShardOwnership(order, pixel, state.shard_margin)))
    checked = {"margin_violations": len(violations),
               "margin_violation_examples": [v.describe() for v in violations[:10]]} \
        if margins else {}
    return {
        "state": str(state.path),
        "format_version": state.manifest["format_version"],
        "created": created.decode() if created else state.manifest.get("created"),
        "shard_nside": state.shard_nside,
        "shard_margin": state.shard_margin,
        "shards": len(per_shard),
        "visits": sum(visits_per_band.values()),
        "visits_incomplete": incomplete,
        "visits_per_band": dict(sorted(visits_per_band.items())),
        "first_visit": first,
        "last_visit": last,
        "sources_read": n_sources,
        "observations": n_selected,
        "observations_stored": stored,
        "margin_fraction": (stored - n_selected) / stored if stored else 0.0,
        "rows_dropped": dict(sorted(dropped.items())),
        "observation_records": records,
        "components_per_band": dict(sorted(components.items())),
        "clique_candidates_per_band": dict(sorted(candidates.items())),
        "primary_bands": list(config.primaryBands),
        "kafka_offsets": offsets,
        "refcat": json.dumps(refcat, sort_keys=True) if (refcat := state.stored_refcat())
        else None,
        "map_size_bytes": map_size,
        "used_bytes": used,
        "shard_counts": per_shard,
        **checked,
    }


def _shard_counts(store: StarStore, min_per_band: int, components: Counter[str],
                  candidates: Counter[str]) -> dict[str, Any]:
    """What one shard stores (one read transaction); adds its components to the totals."""
    visits = stored = core = 0
    with store.read() as tx:
        for _, record in tx.visits.items():
            visits += 1
            stored += int(record.n_selected)
            core += int(record.core_selected or 0)
        for band, comps in tx.components.items():
            components[band] += len(comps["comp_id"])
            candidates[band] += int(np.count_nonzero(
                comps["clique"] & (comps["count"] >= min_per_band)))
        observation_records = tx.observations.count()
    return {"visits": visits, "observations_stored": stored, "core_observations": core,
            "margin_observations": stored - core, "observation_records": observation_records,
            "used_bytes": store.used_bytes()}
