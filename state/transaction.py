"""One transaction of a store, with its named tables.

:meth:`streamstars.state.store.StarStore.write` runs a body with a writable
:class:`Transaction`; :meth:`~streamstars.state.store.StarStore.read` yields a read-only one
(one consistent MVCC view while a writer goes on).  The tables are the only way to the data:

=================  ==========================================================================
``meta``           :class:`~streamstars.state.tables.MetaTable` (config, refcat, flags)
``visits``         :class:`~streamstars.state.tables.VisitTable` (visit records)
``observations``   :class:`~streamstars.state.tables.ObservationTable`
``components``     :class:`~streamstars.state.tables.ComponentTable` (+ the ``rmax`` bound)
``candidates``     :class:`~streamstars.state.tables.CandidateTable`
``members``        :class:`~streamstars.state.tables.MemberTable` (through the writer's cache)
``refcache``       :class:`~streamstars.state.tables.ReferenceCacheTable`
``offsets``        :class:`~streamstars.state.tables.OffsetTable` (Kafka positions)
``source_ids``     :class:`~streamstars.state.source_index.SourceIdIndex`
=================  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb

from streamstars.config import BuildStarsConfig
from streamstars.state.cache import WriteCache
from streamstars.state.environment import MapTrimmer
from streamstars.state.schema import (
    DB_CANDIDATES,
    DB_COMPONENTS,
    DB_MEMBERS,
    DB_META,
    DB_OBSERVATIONS,
    DB_OFFSETS,
    DB_REFMATCH,
    DB_SOURCE_IDS,
    DB_VISITS,
)
from streamstars.state.source_index import SourceIdIndex
from streamstars.state.tables import (
    CandidateTable,
    ComponentTable,
    MemberTable,
    MetaTable,
    ObservationTable,
    OffsetTable,
    ReferenceCacheTable,
    VisitTable,
)


class Transaction:
    """The tables of one store inside one LMDB transaction.

    Attributes:
        path: the store's directory (for messages).
        config: the store's effective configuration.
        writable: a write transaction (values may be written; member lists go through the
            writer's cache).
    """

    def __init__(self, txn: lmdb.Transaction, dbs: dict[bytes, Any], trimmer: MapTrimmer,
                 *, path: Path, config: BuildStarsConfig, cache: WriteCache | None = None,
                 writable: bool = False) -> None:
        self._txn = txn
        self.path = path
        self.config = config
        self.writable = writable
        self.meta = MetaTable(txn, dbs[DB_META], trimmer)
        self.visits = VisitTable(txn, dbs[DB_VISITS], trimmer)
        self.observations = ObservationTable(txn, dbs[DB_OBSERVATIONS], trimmer,
                                             config.storeNside)
        self.components = ComponentTable(txn, dbs[DB_COMPONENTS], trimmer, self.meta)
        self.candidates = CandidateTable(txn, dbs[DB_CANDIDATES], trimmer)
        self.members = MemberTable(txn, dbs[DB_MEMBERS], trimmer, cache)
        self.refcache = ReferenceCacheTable(txn, dbs[DB_REFMATCH], trimmer)
        self.offsets = OffsetTable(txn, dbs[DB_OFFSETS], trimmer)
        self.source_ids = SourceIdIndex(txn, dbs.get(DB_SOURCE_IDS), trimmer)

    def id(self) -> int:
        """LMDB's id of this transaction."""
        return int(self._txn.id())
