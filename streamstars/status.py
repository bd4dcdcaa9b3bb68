"""``streamstars status``: what a store holds, from one read transaction."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from streamstars.select import DROP_REASONS
from streamstars.state import StarStore
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
