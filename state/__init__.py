"""The LMDB-backed star store (installed as ``streamstars.state``).

One store is one LMDB environment: :class:`StarStore` opens it and runs transactions whose
named tables (:class:`Transaction`) are the only way to the data.  A state directory
(:class:`StateDirectory`) is a manifest, a visit index (:class:`VisitIndex`) and one store per
sky shard.  The storage contract is
:mod:`streamstars.state.schema`.  Nothing in this package imports the algorithms
(association, references, snapshot): they use the store through these types.
"""

from streamstars.state.directory import StateDirectory
from streamstars.state.index import IndexRecord, VisitIndex
from streamstars.state.records import VisitRecord
from streamstars.state.store import StarStore
from streamstars.state.transaction import Transaction

__all__ = ["IndexRecord", "StarStore", "StateDirectory", "Transaction", "VisitIndex",
           "VisitRecord"]
