"""Opening a Butler repository: the extra's import guard, collections, dataset types.

Every check raises :class:`~streamstars.errors.ButlerError` (a configuration error: exit code
2, nothing applied) naming the repository, the collection or the dataset type and what to do.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from streamstars.errors import ButlerError

if TYPE_CHECKING:
    from lsst.daf.butler import Butler, DatasetType

__all__ = [
    "INSTALL_HINT",
    "ButlerRepo",
    "dataset_summary",
    "open_butler",
    "parse_collections",
    "require_butler",
]

#: What to run when the extra is missing (quoted for shells that glob brackets).
INSTALL_HINT = "pip install 'streamstars[butler]'"


def require_butler(what: str = "this Butler option") -> ModuleType:
    """Import ``lsst.daf.butler`` (the ``streamstars[butler]`` extra) or say how to install it.

    Raises:
        ButlerError: the package is not importable; the message names ``what`` needed it and
            gives :data:`INSTALL_HINT`.
    """
    try:
        module = importlib.import_module("lsst.daf.butler")
    except ImportError as exc:
        raise ButlerError(
            f"{what} needs the LSST Data Butler (lsst-daf-butler), which is not installed "
            f"({exc}); install the extra with: {INSTALL_HINT}") from exc
    _quiet_pandas_warnings()
    return module


class _NoPandasNoise(logging.Filter):
    """streamstars reads parquet with pyarrow and never needs pandas; the Butler warns about
    its absence whenever it looks at a storage class that could convert to a DataFrame."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Unable to import type pandas"))


_PANDAS_FILTER = _NoPandasNoise()


def _quiet_pandas_warnings() -> None:
    logger = logging.getLogger("lsst.daf.butler._storage_class")
    if _PANDAS_FILTER not in logger.filters:
        logger.addFilter(_PANDAS_FILTER)


def parse_collections(text: str | Sequence[str]) -> list[str]:
    """``"a,b , c"`` (or a list of such strings) -> ``["a", "b", "c"]`` in search order.

    Raises:
        ButlerError: no collection named.
    """
    parts = [text] if isinstance(text, str) else list(text)
    names = [name.strip() for part in parts for name in part.split(",") if name.strip()]
    if not names:
        raise ButlerError("give at least one collection (--collections C[,C...])")
    return list(dict.fromkeys(names))


@dataclass
class ButlerRepo:
    """An open Butler repository and the name it was opened with (for messages)."""

    butler: Butler
    root: str

    def check_collections(self, collections: Iterable[str]) -> list[str]:
        """Check that every collection exists; returns them in search order.

        Raises:
            ButlerError: naming the first missing collection and the repository.
        """
        daf_butler = require_butler()
        names = list(collections)
        for name in names:
            try:
                self.butler.collections.get_info(name)
            except daf_butler.MissingCollectionError as exc:
                raise ButlerError(
                    f"collection {name!r} not found in Butler repository {self.root}; list "
                    "them with `butler query-collections REPO` and fix --collections") from exc
        return names

    def dataset_type(self, name: str, *, required: bool = True,
                     storage_classes: Iterable[str] | None = None) -> DatasetType | None:
        """The registered dataset type ``name`` (None when absent and not ``required``).

        Raises:
            ButlerError: absent and ``required``, or registered with a storage class outside
                ``storage_classes``.
        """
        daf_butler = require_butler()
        try:
            dataset_type: DatasetType = self.butler.get_dataset_type(name)
        except daf_butler.MissingDatasetTypeError as exc:
            if not required:
                return None
            raise ButlerError(
                f"dataset type {name!r} is not registered in Butler repository {self.root}; "
                "check the name and the repository (`butler query-dataset-types REPO`)"
            ) from exc
        allowed = None if storage_classes is None else tuple(storage_classes)
        if allowed is not None and dataset_type.storageClass_name not in allowed:
            raise ButlerError(
                f"dataset type {name!r} in Butler repository {self.root} has storage class "
                f"{dataset_type.storageClass_name!r}; streamstars reads {', '.join(allowed)}")
        return dataset_type


def open_butler(repo: str | Path, *, writeable: bool = False,
                what: str = "--butler") -> ButlerRepo:
    """Open the Butler repository at ``repo`` (a directory or a butler.yaml URI).

    Raises:
        ButlerError: the extra is not installed, or no repository is there.
    """
    daf_butler = require_butler(what)
    try:
        butler: Butler = daf_butler.Butler.from_config(str(repo), writeable=writeable)
    except FileNotFoundError as exc:
        raise ButlerError(
            f"Butler repository {repo} not found (no butler.yaml there): {exc}; give the "
            "repository root (the directory holding butler.yaml) to --butler") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise ButlerError(f"cannot open Butler repository {repo}: {type(exc).__name__}: "
                          f"{exc}") from exc
    return ButlerRepo(butler, str(repo))


def dataset_summary(ref: Any) -> str:
    """``sourceTable_visit {instrument: 'X', visit: 1} (run 'R', id U)`` for messages."""
    return (f"{ref.datasetType.name} {ref.dataId.required} "
            f"(run {ref.run!r}, id {ref.id})")
