"""What every update step of one band works with: the transaction, the band, the settings,
and a visit's new observations."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from streamstars.association.fof import match_chord
from streamstars.columns import ColumnDict, take
from streamstars.config import BuildStarsConfig
from streamstars.sky import fixed_unit_vectors, kdtree, self_pairs_within, vectors_from_fixed
from streamstars.state.transaction import Transaction


@dataclass
class BandUpdateStats:
    """What one band's update did (for logs, metrics and tests)."""

    fast: int = 0  # observations that joined a clique that stays one (join path)
    extended: int = 0  # observations that extended a tracked component's greedy (in order)
    new_singletons: int = 0
    slow_observations: int = 0
    slow_components: int = 0
    untracked_components: int = 0  # involved components whose members had to be re-read
    region_observations: int = 0  # stored observations read for them
    components_in_reach: int = 0  # component records loaded: the local work besides new ones


@dataclass
class BandContext:
    """One primary band's association state inside one write transaction.

    Attributes:
        tx: the write transaction (its tables: components, candidates, members, ...).
        band: the band.
        stats: what the update did so far.
        radius: the chord of ``matchRadius``.
    """

    tx: Transaction
    band: str
    stats: BandUpdateStats = field(default_factory=BandUpdateStats)
    radius: float = field(init=False)

    def __post_init__(self) -> None:
        self.radius = match_chord(self.tx.config.matchRadius)

    @property
    def config(self) -> BuildStarsConfig:
        """The store's configuration."""
        return self.tx.config

    @property
    def nside(self) -> int:
        """``storeNside``: components are keyed by the pixel of their centre."""
        return self.tx.config.storeNside

    @property
    def min_per_band(self) -> int:
        """fgcm's ``minPerBand``."""
        return self.tx.config.minPerBand


@dataclass
class NewObservations:
    """A visit's new observations of one band, with their geometry.

    Attributes:
        columns: identity and position columns (``source_id``, ``visit``, ``ra``, ``dec``...).
        fixed: fixed-point unit vectors (n, 3).
        vectors: float unit vectors (n, 3).
        tree: k-d tree of ``vectors``.
        pairs: (k, 2) pairs of them within the radius of each other.
    """

    columns: ColumnDict
    fixed: np.ndarray
    vectors: np.ndarray
    tree: cKDTree
    pairs: np.ndarray

    @classmethod
    def of(cls, columns: ColumnDict, radius: float) -> NewObservations:
        """The new observations of ``columns``, linked among themselves within ``radius``."""
        fixed = fixed_unit_vectors(columns["ra"], columns["dec"])
        vectors = vectors_from_fixed(fixed)
        tree = kdtree(vectors)
        return cls(columns, fixed, vectors, tree, self_pairs_within(tree, radius))

    def __len__(self) -> int:
        return len(self.columns["source_id"])

    @property
    def source_id(self) -> np.ndarray:
        """sourceIds."""
        return self.columns["source_id"]

    @property
    def visit(self) -> np.ndarray:
        """Visit ids."""
        return self.columns["visit"]

    def subset(self, rows: np.ndarray) -> ColumnDict:
        """The columns of ``rows``."""
        return take(self.columns, rows)
