"""The LMDB-backed star store (installed as ``streamstars.state``).

One store is one LMDB environment: :class:`StarStore` opens it and runs transactions whose
named tables (:class:`Transaction`) are the only way to the data.  The storage contract is
:mod:`streamstars.state.schema`.  Nothing in this package imports the algorithms
(association, references, snapshot): they use the store through these types.
"""

from streamstars.state.records import VisitRecord
from streamstars.state.store import StarStore
from streamstars.state.transaction import Transaction

__all__ = ["StarStore", "Transaction", "VisitRecord"]
