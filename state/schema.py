"""The storage contract of one star store: sub-databases, keys, meta keys and value schemas.

Everything that decides what the bytes of a store mean is here (docs/state.md describes the
same layout in prose); the table types (:mod:`streamstars.state.tables`) and the engine only use
it.  Changing anything here changes the on-disk format: bump :data:`FORMAT_VERSION`.

All integers in keys are big-endian so that LMDB's byte order is numeric order.  ``band8`` is
the band name in ASCII padded with NUL bytes to 8 bytes; ``pixel`` a HEALPix nest pixel at
``storeNside``; ``visit`` an int64 offset by 2**63 (order preserving, :func:`int_key`).

Sub-databases (key -> value):

==================  ==========================================================================
``meta``            ``META_*`` keys below -> their values
``visits``          :func:`int_key` (visit) -> JSON record (:class:`~.records.VisitRecord`)
``observations``    :func:`observation_key` -> that visit's selected observations in that
                    pixel (:data:`STORED_OBSERVATION_DTYPES`)
``components``      :func:`pixel_key` -> the friends-of-friends component records centred in
                    that pixel (:data:`COMPONENT_DTYPES`)
``candidates``      :func:`pixel_key` -> the star candidates of the non-clique components
                    centred in that pixel (:data:`CANDIDATE_DTYPES`)
``members``         :func:`member_key` -> the member list of a tracked component
                    (:data:`MEMBER_DTYPE` rows)
``refmatch``        :func:`refs_key` -> the cached reference stars lying in that pixel
                    (:func:`refcache_schema`)
``offsets``         :func:`offset_key` -> next Kafka offset to consume (:data:`OFFSET_VALUE`)
``source_ids``      :func:`source_block_keys` -> which of 64 sourceIds each visit stores
                    (:data:`SOURCE_ENTRY_DTYPE` records)
==================  ==========================================================================

Columnar values (observations, components, candidates, cached reference stars) are encoded by
:mod:`streamstars.state.codec` in the column order of their schema below.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from streamstars.bands import BAND_KEY_BYTES, band_name_problem
from streamstars.columns import OBSERVATION_DTYPES

#: Bumped whenever the on-disk layout changes; a store of another version is refused.
#: 2: stores are the sky shards of a state directory (:mod:`streamstars.state.directory`);
#: meta ``shard`` and ``instance``; visit records with ``shards`` and ``core_selected``.
FORMAT_VERSION = 2

# ---------------------------------------------------------------------------------------------
# sub-databases
# ---------------------------------------------------------------------------------------------
#: every sub-database (the table in the module docstring says what each holds)
ALL_DBS = (b"meta", b"visits", b"observations", b"components", b"candidates", b"members",
           b"refmatch", b"offsets", b"source_ids")
(DB_META, DB_VISITS, DB_OBSERVATIONS, DB_COMPONENTS, DB_CANDIDATES, DB_MEMBERS, DB_REFMATCH,
 DB_OFFSETS, DB_SOURCE_IDS) = ALL_DBS
#: sub-databases a store written by an older streamstars may lack (readers do without them;
#: the first writer creates them)
OPTIONAL_DBS = (DB_SOURCE_IDS,)

# ---------------------------------------------------------------------------------------------
# meta keys
# ---------------------------------------------------------------------------------------------
#: ASCII integer, :data:`FORMAT_VERSION`
META_FORMAT_VERSION = b"format_version"
#: JSON of the full configuration the store was built with
META_CONFIG = b"config"
#: JSON of the settings that shape stored data (reopening with other values is refused)
META_FINGERPRINT = b"association_fingerprint"
#: ISO time of creation
META_CREATED = b"created"
#: JSON naming the reference catalog whose stars ``refmatch`` caches (docs/references.md)
META_REFCAT = b"refcat"
#: present once ``source_ids`` indexes every stored observation (new stores have it at once;
#: older ones get it built by the first writer)
META_SOURCE_INDEX = b"source_index"
#: JSON ``{"order", "pixel", "nside", "margin"}`` of the sky shard the store is (absent in a
#: store made alone through the Python API)
META_SHARD = b"shard"
#: a UUID drawn when the environment is created: with LMDB's last transaction id it names a
#: shard's *generation* (what an incremental snapshot compares)
META_INSTANCE = b"instance"
#: prefix of ``max_rmax:BAND``: float64 (little endian), an upper bound on ``rmax`` of every
#: stored component of the band (:func:`max_rmax_key`)
META_MAX_RMAX_PREFIX = b"max_rmax:"

MAX_RMAX_VALUE = struct.Struct("<d")

# ---------------------------------------------------------------------------------------------
# value schemas
# ---------------------------------------------------------------------------------------------
#: One friends-of-friends component of one primary band (``components``), sorted by comp_id.
COMPONENT_DTYPES: dict[str, np.dtype] = {
    "comp_id": np.dtype(np.int64),  # smallest member sourceId (unique per band)
    "count": np.dtype(np.int64),
    "sx": np.dtype(np.int64),  # exact sums of the members' fixed-point unit vectors
    "sy": np.dtype(np.int64),
    "sz": np.dtype(np.int64),
    "rmax": np.dtype(np.float64),  # chord upper bound of member distance from the centre
    "clique": np.dtype(np.bool_),
    "seed_visit": np.dtype(np.int64),
    "seed_src": np.dtype(np.int64),
    "tracked": np.dtype(np.bool_),  # its member list is kept in the ``members`` sub-database
}

#: One member of a tracked component (row-oriented so that appending is a byte concatenation).
MEMBER_DTYPE = np.dtype([("source_id", "<i8"), ("visit", "<i8"), ("x", "<i8"), ("y", "<i8"),
                         ("z", "<i8")])

#: One star candidate of a non-clique component (``candidates``).
CANDIDATE_DTYPES: dict[str, np.dtype] = {
    "comp_id": np.dtype(np.int64),
    "star_id": np.dtype(np.int64),  # smallest sourceId of the candidate's group
    "count": np.dtype(np.int64),
    "sx": np.dtype(np.int64),
    "sy": np.dtype(np.int64),
    "sz": np.dtype(np.int64),
    "seed_visit": np.dtype(np.int64),
    "seed_src": np.dtype(np.int64),
}

#: Observations are stored per (band, storeNside pixel, visit), rows sorted by their pixel at
#: ``storeNside * FINE_FACTOR`` (nest, so fine >> FINE_SHIFT is the store pixel): exact
#: association work reads only the rows of the few fine pixels (~13" at nside 256) it needs.
FINE_FACTOR = 64
FINE_SHIFT = 12  # log2(FINE_FACTOR**2)
STORED_OBSERVATION_DTYPES: dict[str, np.dtype] = {**OBSERVATION_DTYPES,
                                                  "fine_pixel": np.dtype(np.int64)}

#: The observation columns the association reads (identity and position).
POSITION_COLUMNS = frozenset({"source_id", "visit", "ra", "dec"})
POSITION_DTYPES = {k: v for k, v in OBSERVATION_DTYPES.items() if k in POSITION_COLUMNS}


def refcache_schema(n_filters: int) -> dict[str, np.dtype]:
    """The columnar schema of a ``refmatch`` record with ``n_filters`` filters.

    ``ref_id`` (the refcat ``id``), ``ra``/``dec`` [deg], then one float32 ``mag_<j>`` per
    filter and one float32 ``mag_err_<j>`` per filter (``j`` indexes FILTERNAMES; 99 =
    missing).  Rows are sorted by ``ref_id``.
    """
    schema: dict[str, np.dtype] = {
        "ref_id": np.dtype(np.int64),
        "ra": np.dtype(np.float64),
        "dec": np.dtype(np.float64),
    }
    for j in range(n_filters):
        schema[f"mag_{j}"] = np.dtype(np.float32)
    for j in range(n_filters):
        schema[f"mag_err_{j}"] = np.dtype(np.float32)
    return schema


#: The sourceId index (``source_ids``) groups ids in blocks of 2**SOURCE_BLOCK_BITS; a block's
#: value is a list of these records, ``bits`` marking which of its ids ``visit`` stores.
SOURCE_BLOCK_BITS = 6
SOURCE_ENTRY_DTYPE = np.dtype([("bits", "<u8"), ("visit", "<i8")])

#: The value of an ``offsets`` key: the next offset to consume.
OFFSET_VALUE = struct.Struct(">Q")

# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_SIGN = 1 << 63


@functools.lru_cache(maxsize=256)
def band_key(band: str) -> bytes:
    """Fixed-width (8 byte) key prefix of a band name (cached: keys are built per pixel).

    Raises:
        ValueError: not a storable band name (:func:`streamstars.bands.band_name_problem`);
            visits and configurations are checked before anything reaches here.
    """
    problem = band_name_problem(band)
    if problem is not None:
        raise ValueError(f"band {band!r}: {problem}")
    return band.encode("ascii").ljust(BAND_KEY_BYTES, b"\0")


def band_from_key(key: bytes) -> str:
    """Inverse of :func:`band_key` (reads the first 8 bytes)."""
    return key[:BAND_KEY_BYTES].rstrip(b"\0").decode("ascii")


def int_key(value: int) -> bytes:
    """Order-preserving 8-byte key of a signed 64-bit integer (a visit in ``visits``)."""
    return _U64.pack((int(value) + _SIGN) & 0xFFFFFFFFFFFFFFFF)


def int_from_key(key: bytes, offset: int = 0) -> int:
    """Inverse of :func:`int_key`."""
    return int(_U64.unpack_from(key, offset)[0]) - _SIGN


def pixel_key(band: str, pixel: int) -> bytes:
    """Key of a (band, pixel) record in ``components`` / ``candidates``; also the prefix of
    that pixel's ``observations`` keys."""
    return band_key(band) + _U64.pack(int(pixel))


def observation_key(band: str, pixel: int, visit: int) -> bytes:
    """Key of one visit's observations in one pixel."""
    return band_key(band) + _U64.pack(int(pixel)) + int_key(visit)


def member_key(band: str, comp_id: int) -> bytes:
    """Key of a tracked component's member list."""
    return band_key(band) + int_key(comp_id)


def refs_key(pixel: int) -> bytes:
    """Key of a pixel's record in ``refmatch``: the pixel as 8 big-endian bytes."""
    return _U64.pack(int(pixel))


def offset_key(topic: str, partition: int) -> bytes:
    """Key of a Kafka (topic, partition) in ``offsets``."""
    return topic.encode() + b"\0" + _U32.pack(partition)


def offset_from_key(key: bytes) -> tuple[str, int]:
    """Inverse of :func:`offset_key`: (topic, partition)."""
    return key[:-5].decode(), int(_U32.unpack(key[-4:])[0])


def max_rmax_key(band: str) -> bytes:
    """The ``meta`` key of the ``rmax`` bound of ``band``'s components."""
    return META_MAX_RMAX_PREFIX + band.encode()


def source_block_keys(blocks: np.ndarray) -> list[bytes]:
    """Keys of ``source_ids`` blocks (uint64 block numbers, ``(sourceId ^ 2**63) >> 6``)."""
    raw = np.asarray(blocks, dtype=">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]
