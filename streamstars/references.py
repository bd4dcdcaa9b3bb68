"""Reference stars for the snapshot: cached per store pixel, matched to the final stars.

fgcmcal's ``FgcmLoadReferenceCatalogTask`` (reference §1.3, §5) loads, per coarse sky region,
the reference stars passing the reference selector, converts ``filterMap`` fluxes to AB
magnitudes (optionally with colour terms) and gives each reference star its nearest star
within ``matchRadius``.  streamstars splits this in two:

1. **Per visit** (:func:`cache_reference_pixels`, called from the visit's ONE write
   transaction): every ``storeNside`` (nest) pixel the visit touched, *plus its 8 neighbours*,
   that has no record yet in the ``refmatch`` sub-database gets one: the reference stars whose
   position lies in that pixel, already selected, with their magnitudes.  A pixel without
   reference stars gets an empty record, so it is never reloaded.  Reference stars are thus
   read from the catalog once per pixel over the life of the store.
2. **At snapshot time** (:func:`snapshot_references`, same read transaction as the stars):
   every cached reference star is matched to the FINAL stars with
   :func:`streamstars.refmatch.match_reference_to_stars`, one global KD-tree: each reference
   star picks its nearest star within ``fgcmLoadReferenceCatalog.matchRadius``; when two
   reference stars pick the same star only the nearest keeps it (the other stays unmatched).
   Since the cache holds the neighbours of every pixel holding observations, and a star is
   within the association ``matchRadius`` of its observations, a reference star within
   ``matchRadius`` of a star near a pixel border is always cached (it is in the star's pixel
   or a neighbour as long as the two radii add up to less than a pixel, 13.7' at nside 256):
   no edge misses.

``refmatch`` records
--------------------
Key: the 8-byte big-endian pixel number (:func:`streamstars.state.schema.refs_key`).  Value: a
columnar record (:func:`streamstars.state.codec.encode_columns`) with the schema
:func:`streamstars.state.schema.refcache_schema`:
``ref_id`` int64 (the refcat ``id``), ``ra``, ``dec`` float64 degrees (``coord_ra``/``coord_dec``
converted, RA in [0, 360)), then one float32 column ``mag_<j>`` per filter and one float32
column ``mag_err_<j>`` per filter, ``j`` indexing ``FILTERNAMES`` (the physical filters of
``filterMap``, in the order given); 99 = missing.  Rows are sorted by ``ref_id``.  The number of
filters is fixed per store by the ``refcat`` metadata below.

``meta/refcat``
---------------
JSON (:meth:`ReferenceSource.identity`) naming the catalog in use: absolute ``path``,
``dataset_name``, ``format_version``, HTM ``depth``, the refcat ``columns`` read, ``filters``
(FILTERNAMES), ``filterMap``, ``applyColorTerms``, ``colorterms`` (those used),
``referenceSelector`` and ``settings_hash`` (SHA-256 of the settings that shape the cached
magnitudes and selection).  ``matchRadius`` is a snapshot-time setting and not part of it.  A
store whose ``refcat`` differs from the configured catalog, or that holds visits applied
without a catalog, is refused until ``streamstars refresh-refs`` (:func:`refresh_all`)
rebuilds the cache.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from tqdm import tqdm

from streamstars.columns import ColumnDict
from streamstars.config import BuildStarsConfig, RefcatLoadConfig, to_dict
from streamstars.errors import RefcatError, StateError
from streamstars.io.refcat import HtmRefcat
from streamstars.refmatch import (
    match_reference_to_stars,
    reference_columns_needed,
    reference_magnitudes,
)
from streamstars.sky import pixels_of, unit_vectors, with_neighbours
from streamstars.state import StarStore, StateDirectory, Transaction
from streamstars.state.schema import refcache_schema

__all__ = [
    "CONFIGURED",
    "REFCACHE_FORMAT_VERSION",
    "ReferenceChoice",
    "ReferenceSource",
    "ReferenceStats",
    "attach_references",
    "cache_reference_pixels",
    "open_reference_source",
    "read_cached_references",
    "refresh_all",
    "resolve_references",
    "snapshot_references",
    "stored_refcat",
]

#: Version of the ``refmatch`` record layout and of the ``meta/refcat`` JSON.
REFCACHE_FORMAT_VERSION = 1
#: Pixels loaded from the refcat per batch in :func:`refresh_all` (nest order: compact regions).
REFRESH_BATCH_PIXELS = 256

_BASE_COLUMNS = ("id", "coord_ra", "coord_dec")


@dataclass
class ReferenceStats:
    """What one cache fill did (per visit or for a full refresh)."""

    pixels_checked: int = 0
    pixels_filled: int = 0
    stars_cached: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# the configured catalog
# ---------------------------------------------------------------------------------------------
@dataclass
class ReferenceSource:
    """A validated reference catalog plus the ``[fgcmLoadReferenceCatalog]`` settings."""

    refcat: HtmRefcat
    config: RefcatLoadConfig
    filters: tuple[str, ...]
    columns: tuple[str, ...]
    _identity: dict[str, Any] | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def schema(self) -> dict[str, np.dtype]:
        """The ``refmatch`` record schema of this source."""
        return refcache_schema(len(self.filters))

    def settings(self) -> dict[str, Any]:
        """The configuration that shapes the cached selection and magnitudes."""
        return _settings(self.config)

    def identity(self) -> dict[str, Any]:
        """The ``meta/refcat`` JSON of this source (see the module docstring)."""
        if self._identity is None:
            self._identity = self._make_identity()
        return dict(self._identity)

    def _make_identity(self) -> dict[str, Any]:
        settings = self.settings()
        return {
            "cache_format": REFCACHE_FORMAT_VERSION,
            "path": str(Path(self.refcat.path).resolve()),
            "dataset_name": self.refcat.dataset_name,
            "format_version": self.refcat.format_version,
            "depth": self.refcat.depth,
            "columns": list(self.columns),
            **settings,
            "settings_hash": _settings_hash(settings),
        }

    def load_pixels(self, pixels: np.ndarray, nside: int) -> tuple[ColumnDict, np.ndarray]:
        """Selected reference stars lying in the given nest pixels and the pixel of each.

        Returns ``(columns, pixel)`` with columns of :attr:`schema` (not yet sorted).
        """
        pixels = np.unique(np.asarray(pixels, dtype=np.int64))
        shards = self.refcat.shards_for_healpix(pixels, nside, margin_arcsec=1.0)
        data = self.refcat.load(shards, [*_BASE_COLUMNS, *self.columns])
        ra = np.degrees(data["coord_ra"]) % 360.0
        dec = np.degrees(data["coord_dec"])
        pix = pixels_of(unit_vectors(ra, dec), nside)
        cfg = self.config
        mag, mag_err, keep = reference_magnitudes(
            data, cfg.filterMap, self.filters, cfg.referenceSelector, cfg.colorterms,
            cfg.applyColorTerms, self.refcat.flag_names)
        rows = np.flatnonzero(keep & np.isin(pix, pixels) & np.isfinite(ra) & np.isfinite(dec))
        out: ColumnDict = {
            "ref_id": np.asarray(data["id"], dtype=np.int64)[rows],
            "ra": ra[rows],
            "dec": dec[rows],
        }
        for j in range(len(self.filters)):
            out[f"mag_{j}"] = mag[rows, j]
        for j in range(len(self.filters)):
            out[f"mag_err_{j}"] = mag_err[rows, j]
        return out, pix[rows]


def _settings(cfg: RefcatLoadConfig) -> dict[str, Any]:
    filters = list(cfg.filterMap)
    colorterms = ({pf: to_dict(cfg.colorterms[pf]) for pf in filters if pf in cfg.colorterms}
                  if cfg.applyColorTerms else {})
    return {
        "filters": filters,
        "filterMap": dict(cfg.filterMap),
        "applyColorTerms": bool(cfg.applyColorTerms),
        "colorterms": colorterms,
        "referenceSelector": to_dict(cfg.referenceSelector),
    }


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def open_reference_source(cfg: RefcatLoadConfig,
                          butler: str | None = None) -> ReferenceSource | None:
    """Open and validate the configured catalog (``None`` when ``path`` and ``collections``
    are empty).

    With ``collections`` the catalog is read from a Butler repository
    (:class:`streamstars.butler.refcat.ButlerRefcat`): ``cfg.repo``, else ``butler`` (the
    command's ``--butler``).

    Checks, before any visit is read: the directory, ``config.py`` and ``master_schema.fits``
    exist; the format version is >= 1 (``config.py``, overridden by the FITS header); every
    ``filterMap`` target has ``<f>_flux``/``<f>_fluxErr`` (or, with ``applyColorTerms``, every
    colour term's primary and secondary); the selector's columns and flags exist; and the
    header of EVERY shard file lists all of these columns and no version 0.

    Raises:
        RefcatError: naming the missing directory, file, column or the bad version.
        ButlerError: the Butler repository, collection or dataset type cannot be used.
    """
    if cfg.collections:
        refcat: HtmRefcat = _butler_refcat(cfg, butler)
    elif not cfg.path:
        return None
    else:
        refcat = HtmRefcat(cfg.path)
    filters = tuple(cfg.filterMap)
    if not filters:
        raise RefcatError(
            f"fgcmLoadReferenceCatalog names {cfg.path or refcat.dataset_name!r} but filterMap "
            "is empty; map each "
            "physical filter to a reference catalog filter, e.g. filterMap = {\"r_57\" = \"r\"}")
    if not cfg.matchRadius > 0:
        raise RefcatError(
            f"fgcmLoadReferenceCatalog.matchRadius must be > 0 arcsec, got {cfg.matchRadius}")
    columns = tuple(reference_columns_needed(cfg.filterMap, filters, cfg.referenceSelector,
                                             cfg.colorterms, cfg.applyColorTerms))
    refcat.validate((), selector=None, extra_columns=[*_BASE_COLUMNS, *columns])
    _check_all_shards(refcat, [*_BASE_COLUMNS, *columns])
    return ReferenceSource(refcat, cfg, filters, columns)


def _butler_refcat(cfg: RefcatLoadConfig, butler: str | None) -> HtmRefcat:
    if cfg.path:
        raise RefcatError("fgcmLoadReferenceCatalog sets both path and collections; keep one "
                          "(a refcat directory, or the Butler collections holding it)")
    repo = cfg.repo or butler
    if not repo:
        raise RefcatError(
            "fgcmLoadReferenceCatalog.collections is set but no Butler repository is given: "
            "set fgcmLoadReferenceCatalog.repo or pass --butler REPO")
    from streamstars.butler.refcat import open_butler_refcat

    return open_butler_refcat(repo, cfg.collections, cfg.datasetType)


def _check_all_shards(refcat: HtmRefcat, required: list[str]) -> None:
    """Every shard file's header lists the required columns (or flag bits); no version 0."""
    for shard in refcat.existing_shards():
        path = refcat.shard_path(shard)
        cards = _fits_table_cards(path)
        names = {v for k, v in cards.items() if k.startswith("TTYPE")}
        flags = {v for k, v in cards.items() if k.startswith("TFLAG")} if "flags" in names \
            else set()
        missing = [c for c in required if c not in names and c not in flags]
        if missing:
            raise RefcatError(
                f"reference shard {path} has no column(s) {missing}; its columns are "
                f"{sorted(names)} -- the shard does not match master_schema.fits (needed by "
                "fgcmLoadReferenceCatalog filterMap/referenceSelector)")
        version = cards.get("REFCAT_FORMAT_VERSION")
        if version is not None:
            try:
                number = int(version)
            except ValueError as exc:
                raise RefcatError(f"{path}: invalid REFCAT_FORMAT_VERSION {version!r}") from exc
            if number < 1:
                raise RefcatError(
                    f"reference shard {path} has format version {number}: its fluxes are in Jy "
                    "(LSST refcat format 0), which is no longer supported; convert the catalog "
                    "to nJy (format version >= 1)")


_BLOCK = 2880


def _fits_table_cards(path: Path) -> dict[str, str]:
    """TTYPEn / TFLAGn / REFCAT_FORMAT_VERSION cards of the first extension (fast, raw read).

    Reads only the primary header, skips its data and reads the extension header: a few
    kilobytes per file, so every shard of a large catalog can be checked at start-up.
    """
    try:
        with open(path, "rb") as fh:
            primary = _read_header_cards(fh, path)
            skip = _data_bytes(primary)
            fh.seek(skip, os.SEEK_CUR)
            return _read_header_cards(fh, path)
    except OSError as exc:
        raise RefcatError(f"cannot read reference shard {path}: {exc}") from exc


def _read_header_cards(fh: Any, path: Path) -> dict[str, str]:
    cards: dict[str, str] = {}
    while True:
        block = fh.read(_BLOCK)
        if len(block) < _BLOCK:
            raise RefcatError(f"reference shard {path} is truncated or not a FITS table")
        text = block.decode("ascii", errors="replace")
        for i in range(0, _BLOCK, 80):
            card = text[i:i + 80]
            key = card[:8].strip()
            if key == "END":
                return cards
            if key == "HIERARCH":
                name, _, rest = card[9:].partition("=")
                cards[name.strip()] = _card_value(rest)
            elif card[8:10] == "= ":
                cards[key] = _card_value(card[10:])


def _card_value(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith("'"):
        end = 1
        while True:
            end = raw.find("'", end)
            if end < 0:
                return raw[1:].rstrip()
            if raw[end + 1:end + 2] == "'":
                end += 2
                continue
            return raw[1:end].replace("''", "'").rstrip()
    return raw.split("/", 1)[0].strip()


def _data_bytes(cards: dict[str, str]) -> int:
    naxis = int(cards.get("NAXIS", "0"))
    if naxis == 0:
        return 0
    size = abs(int(cards.get("BITPIX", "8"))) // 8
    count = 1
    for k in range(1, naxis + 1):
        count *= int(cards.get(f"NAXIS{k}", "0"))
    nbytes = size * int(cards.get("GCOUNT", "1")) * (int(cards.get("PCOUNT", "0")) + count)
    return -(-nbytes // _BLOCK) * _BLOCK


# ---------------------------------------------------------------------------------------------
# store wiring
# ---------------------------------------------------------------------------------------------
class _Configured(enum.Enum):
    CONFIGURED = "the store's configured reference catalog"


#: ``references=CONFIGURED``: open the store's configured catalog and check it against the
#: store (:func:`attach_references`) when called.
CONFIGURED = _Configured.CONFIGURED

#: What a caller applying visits names as their reference catalog: an attached source,
#: ``None`` (no catalog) or :data:`CONFIGURED`.
ReferenceChoice: TypeAlias = ReferenceSource | None | _Configured


#: What reference catalogs are attached to: one store, or a state directory (whose index
#: records the catalog every shard caches).
RefTarget: TypeAlias = StarStore | StateDirectory


def stored_refcat(store: RefTarget) -> dict[str, Any] | None:
    """The ``meta/refcat`` JSON of a store (of a state directory: its index's), or ``None``."""
    if isinstance(store, StateDirectory):
        return store.stored_refcat()
    with store.read() as tx:
        return tx.meta.refcat()


def _has_visits(store: RefTarget) -> bool:
    if isinstance(store, StateDirectory):
        with store.index.read() as tx:
            return tx.count() > 0
    with store.read() as tx:
        return any(True for _ in tx.visits.items())


def _record_refcat(store: RefTarget, identity: dict[str, Any] | None) -> None:
    """Record the cached catalog's identity: in a state directory in every shard, then in its
    index (new shards copy it from there)."""
    if isinstance(store, StateDirectory):
        for _, pixel in store.shards():
            store.shard_for_write(pixel).write(lambda tx: tx.meta.set_refcat(identity))
        store.set_refcat(identity)
        return
    store.write(lambda tx: tx.meta.set_refcat(identity))


def _refresh_hint(path: Path) -> str:
    return (f"run `streamstars refresh-refs --state {path} [--config FILE]` to rebuild "
            "the reference-star cache for the configured catalog")


def attach_references(store: RefTarget, source: ReferenceSource | None = None, *,
                      check: bool = True, butler: str | None = None) -> ReferenceSource | None:
    """The reference catalog visits applied to ``store`` cache stars from, checked.

    ``source`` may be an already validated :func:`open_reference_source` result for
    ``store.config.fgcmLoadReferenceCatalog`` (``None``: it is opened now); ``butler`` is the
    command's Butler repository (for a catalog kept in a Butler).  With ``check``
    (every caller but ``refresh-refs``) the store's ``meta/refcat`` must agree with it; an
    empty store without ``meta/refcat`` gets the configured one recorded.  Pass the result to
    :func:`streamstars.ingest.apply_prepared` / :func:`streamstars.backfill.backfill` as
    ``references``: the store itself holds no reference to it.

    Raises:
        RefcatError: the configured catalog cannot be used.
        StateError: the store caches another catalog (or none while it holds visits); the
            message says to run ``streamstars refresh-refs``.
    """
    if source is None:
        source = open_reference_source(store.config.fgcmLoadReferenceCatalog, butler)
    if check:
        stored = stored_refcat(store)
        if source is None:
            if stored is not None:
                raise StateError(
                    f"{store.path} caches reference stars of {stored.get('dataset_name')!r} "
                    f"({stored.get('path')}) but the configuration has no "
                    "[fgcmLoadReferenceCatalog] path; use the same reference-catalog settings, or "
                    + _refresh_hint(store.path) + " (with an empty path it drops the cache)")
        elif stored is None:
            if _has_visits(store):
                raise StateError(
                    f"{store.path} holds visits applied without a reference catalog, and the "
                    f"configuration now names {source.refcat.path}; "
                    + _refresh_hint(store.path))
            if not store.readonly:
                _record_refcat(store, source.identity())
        else:
            identity = source.identity()
            if stored != identity:
                keys = sorted(k for k in set(stored) | set(identity)
                              if stored.get(k) != identity.get(k) and k != "settings_hash")
                details = "; ".join(f"{k}: stored {stored.get(k)!r}, configured "
                                    f"{identity.get(k)!r}" for k in keys)
                raise StateError(
                    f"{store.path} caches reference stars of another reference catalog or "
                    f"with other settings ({details}); " + _refresh_hint(store.path))
    return source


def resolve_references(store: RefTarget, references: ReferenceChoice) -> ReferenceSource | None:
    """``references`` as given, or, for :data:`CONFIGURED`, :func:`attach_references` now."""
    if isinstance(references, _Configured):
        return attach_references(store)
    return references


def _write_pixels(tx: Transaction, source: ReferenceSource, pixels: np.ndarray) -> int:
    """Load and write the records of ``pixels`` (sorted unique); returns stars written."""
    data, pix = source.load_pixels(pixels, tx.config.storeNside)
    order = np.lexsort((data["ref_id"], pix))
    pix = pix[order]
    # row range of each requested pixel (empty ranges -> empty records)
    lo = np.searchsorted(pix, pixels, side="left")
    hi = np.searchsorted(pix, pixels, side="right")
    sorted_cols = {k: v[order] for k, v in data.items()}
    n_filters = len(source.filters)
    for p, a, b in zip(pixels.tolist(), lo.tolist(), hi.tolist(), strict=True):
        tx.refcache.put(p, {k: v[a:b] for k, v in sorted_cols.items()}, n_filters)
    return len(pix)


def cache_reference_pixels(tx: Transaction, source: ReferenceSource | None,
                           pixels: Iterable[int]) -> ReferenceStats:
    """Cache the reference stars of ``pixels`` and their neighbours not cached yet.

    Runs inside the caller's write transaction (the visit's).  A no-op without a catalog
    (``source`` None) as long as the store caches none either.

    Raises:
        StateError: the store's cache was rebuilt for another catalog, or for one while this
            process runs without (refresh-refs ran meanwhile), or the catalog could not be
            read mid-stream (the visit is not applied).
    """
    start = time.perf_counter()
    stats = ReferenceStats()
    # another process (refresh-refs) may have rebuilt the cache since this one attached
    stored = tx.meta.refcat()
    if source is None:
        if stored is not None:
            raise StateError(
                f"{tx.path} now caches reference stars (refresh-refs ran while this process "
                "was running without a reference catalog); restart with the same "
                "[fgcmLoadReferenceCatalog] settings")
        return stats
    if stored is None or stored != source.identity():
        raise StateError(
            f"the reference-star cache of {tx.path} was rebuilt for another catalog or other "
            "settings (refresh-refs) while this process was running; restart it with the "
            "configuration given to refresh-refs (nothing of the visit was stored)")
    wanted = with_neighbours(np.fromiter(pixels, dtype=np.int64), tx.config.storeNside)
    missing = tx.refcache.missing(wanted.tolist())
    stats.pixels_checked = len(wanted)
    if len(missing):
        try:
            stats.stars_cached = _write_pixels(tx, source, missing)
        except RefcatError as exc:
            raise StateError(
                f"reading the reference catalog {source.refcat.path} failed while applying a "
                f"visit (nothing of the visit was stored): {exc}") from exc
        stats.pixels_filled = len(missing)
    stats.seconds = time.perf_counter() - start
    return stats


def _observed_pixels(tx: Transaction) -> np.ndarray:
    pixels = [np.asarray(rec.pixels, dtype=np.int64) for _, rec in tx.visits.items()]
    return np.unique(np.concatenate(pixels)) if pixels else np.zeros(0, dtype=np.int64)


def refresh_all(store: RefTarget, source: ReferenceChoice = CONFIGURED, *,
                progress: bool = False,
                batch_pixels: int = REFRESH_BATCH_PIXELS) -> tuple[int, float]:
    """Drop and rebuild every ``refmatch`` record in ONE write transaction (of a state
    directory: one per shard, then its index records the catalog; a crash in between leaves
    the index naming the old catalog, so every writer refuses to start until refresh-refs is
    run again).

    ``source`` is the catalog to cache (``None``: none, the cache is dropped; default: the
    store's configured catalog, opened now without checking it against the store's cache —
    this is how a cache is changed).  Every
    pixel holding observations and its neighbours gets a record; ``meta/refcat`` and the
    ``fgcmLoadReferenceCatalog`` table of the stored configuration are updated to the
    configured catalog (both removed when it has no path, which just drops the cache).

    Returns:
        ``(reference stars cached, seconds)``.
    """
    start = time.perf_counter()
    catalog = attach_references(store, check=False) if isinstance(source, _Configured) \
        else source
    if isinstance(store, StateDirectory):
        shards = store.shards()
        total = 0
        with tqdm(total=len(shards), unit="shard", desc="refresh-refs", dynamic_ncols=True,
                  disable=not progress) as bar:
            for _, pixel in shards:
                total += refresh_all(store.shard_for_write(pixel), catalog,
                                     batch_pixels=batch_pixels)[0]
                bar.update(1)
                bar.set_postfix(refs=f"{total:,}")
        store.set_config(store.config)  # its reference settings are those just cached
        store.set_refcat(None if catalog is None else catalog.identity())
        return total, time.perf_counter() - start

    def body(tx: Transaction) -> int:
        tx.refcache.clear()
        stored_cfg = tx.meta.config()
        if stored_cfg is not None:
            tx.meta.set_config(dataclasses.replace(
                stored_cfg, fgcmLoadReferenceCatalog=store.config.fgcmLoadReferenceCatalog))
        if catalog is None:
            tx.meta.set_refcat(None)
            return 0
        pixels = with_neighbours(_observed_pixels(tx), store.config.storeNside)
        total = 0
        with tqdm(total=len(pixels), unit="pixel", desc="refresh-refs", dynamic_ncols=True,
                  disable=not progress) as bar:
            for lo in range(0, len(pixels), max(1, batch_pixels)):
                chunk = pixels[lo:lo + batch_pixels]
                total += _write_pixels(tx, catalog, chunk)
                bar.update(len(chunk))
                bar.set_postfix(refs=f"{total:,}")
        tx.meta.set_refcat(catalog.identity())
        return total

    n = store.write(body)
    return n, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# snapshot
# ---------------------------------------------------------------------------------------------
def read_cached_references(tx: Transaction, n_filters: int) -> dict[str, np.ndarray]:
    """Every cached reference star: ``ref_id``, ``ra``, ``dec``, ``refMag``, ``refMagErr``."""
    schema = refcache_schema(n_filters)
    parts = list(tx.refcache.records(n_filters))

    def cat(name: str) -> np.ndarray:
        if not parts:
            return np.zeros(0, dtype=schema[name])
        return np.concatenate([p[name] for p in parts])

    mags = [cat(f"mag_{j}") for j in range(n_filters)]
    errs = [cat(f"mag_err_{j}") for j in range(n_filters)]
    n = len(cat("ref_id"))
    return {
        "ref_id": cat("ref_id"),
        "ra": cat("ra"),
        "dec": cat("dec"),
        "refMag": np.stack(mags, axis=1) if mags else np.zeros((n, 0), np.float32),
        "refMagErr": np.stack(errs, axis=1) if errs else np.zeros((n, 0), np.float32),
    }


def snapshot_references(tx: Transaction, config: BuildStarsConfig, star_id: np.ndarray,
                        star_ra: np.ndarray, star_dec: np.ndarray,
                        ) -> tuple[dict[str, np.ndarray] | None, tuple[str, ...],
                                   dict[str, Any] | None]:
    """The ``fgcmReferenceStars`` rows of the final stars, from the cache in ``tx``.

    Returns ``(reference, FILTERNAMES, meta/refcat)``; ``reference`` is ``None`` when the store
    caches no catalog or ``config`` has no ``fgcmLoadReferenceCatalog.path`` nor
    ``collections`` (no matching asked for).  Rows: ``fgcm_id`` int64 (sorted),
    ``refMag``/``refMagErr`` float32 (n, nFilters); ``ref_id`` is included for diagnostics.

    Raises:
        StateError: ``config``'s reference settings differ from those of the cache.
    """
    stored = tx.meta.refcat()
    cfg = config.fgcmLoadReferenceCatalog
    if stored is None or not (cfg.path or cfg.collections):
        return None, (), stored
    settings_hash = _settings_hash(_settings(cfg))
    if settings_hash != stored.get("settings_hash"):
        raise StateError(
            f"the configuration's [fgcmLoadReferenceCatalog] settings differ from those the "
            f"store's reference-star cache was built with ({stored.get('filters')}, selector "
            f"{stored.get('referenceSelector')}); " + _refresh_hint(tx.path))
    filters = tuple(str(f) for f in stored["filters"])
    refs = read_cached_references(tx, len(filters))
    ri, si = match_reference_to_stars(refs["ra"], refs["dec"], star_ra, star_dec, star_id,
                                      cfg.matchRadius, ref_ids=refs["ref_id"])
    order = np.argsort(np.asarray(star_id)[si], kind="stable")
    ri, si = ri[order], si[order]
    reference = {
        "fgcm_id": np.asarray(star_id, dtype=np.int64)[si],
        "refMag": refs["refMag"][ri].astype(np.float32),
        "refMagErr": refs["refMagErr"][ri].astype(np.float32),
        "ref_id": refs["ref_id"][ri],
    }
    return reference, filters, stored
