"""The fgcm input catalogs of one *snapshot* directory: write, read, compare.

A snapshot is what fgcmcal's ``FgcmBuildStarsTableTask`` would have written for the visits
applied so far (docs/snapshot-format.md), in two flavours, each in its own module:

* the legacy FITS files (:mod:`streamstars.io.snapshot_fits`): ``fgcmVisitCatalog.fits``,
  ``fgcmStarObservations.fits``, ``fgcmStarIds.fits``, ``fgcmStarIndices.fits`` and, when a
  reference catalog was matched, ``fgcmReferenceStars.fits``;
* the production parquet files (:mod:`streamstars.io.snapshot_parquet`):
  ``fgcm_star_observations.parquet``, ``fgcm_star_ids.parquet``, ``fgcmVisitCatalog.parquet``
  and ``fgcm_reference_stars.parquet``.

What a snapshot holds and its validation are in :mod:`streamstars.io.snapshot_catalogs`; the
directory (staged beside ``out_dir``, swapped into place atomically, the manifest
``SNAPSHOT.json``) in :mod:`streamstars.io.snapshot_directory`.  This module is the front:
:func:`write_snapshot`, :func:`read_snapshot` and :func:`compare_snapshots` dispatch to the
format modules, and the public names of all of them are importable from here.

Provenance (``SnapshotCatalogs.metadata``, a ``dict[str, str]``; ``created`` and
``streamstars_version`` are added when absent) is stored as a sorted-key JSON string: in the
FITS primary headers (``SSPROV``), in the parquet schema metadata (``streamstars``) and in the
manifest.  No file carries the wall-clock time except through the provenance ``created``
value, so two writes of identical catalogs with identical metadata are byte-identical, and
:func:`compare_snapshots` (which ignores ``created`` by default) reports no difference between
two runs that differ only in when they ran.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from streamstars.io import snapshot_fits, snapshot_parquet
from streamstars.io.hats import compare_catalogs
from streamstars.io.snapshot_catalogs import (
    FITS_FILES,
    HATS_CATALOG_DIR,
    MANIFEST_NAME,
    PARQUET_FILES,
    REFSTARS_FORMAT_VERSION,
    SNAPSHOT_ENTRIES,
    STAR_DTYPES,
    VISIT_ARRAY_FIELDS,
    VISIT_SCALAR_DTYPES,
    SnapshotCatalogs,
    check_formats,
    normalise_catalogs,
)
from streamstars.io.snapshot_directory import (
    SnapshotDirectoryError,
    SnapshotStaging,
    SnapshotWriteError,
    compare_manifests,
    stage_snapshot,
    write_manifest,
)

__all__ = [
    # dispatch to the format modules
    "compare_snapshots", "read_snapshot", "write_snapshot",
    # what a snapshot holds (snapshot_catalogs)
    "FITS_FILES", "HATS_CATALOG_DIR", "MANIFEST_NAME", "PARQUET_FILES", "REFSTARS_FORMAT_VERSION",
    "SNAPSHOT_ENTRIES", "STAR_DTYPES", "VISIT_ARRAY_FIELDS", "VISIT_SCALAR_DTYPES",
    "SnapshotCatalogs",
    # the directory (snapshot_directory)
    "SnapshotDirectoryError", "SnapshotStaging", "SnapshotWriteError", "stage_snapshot",
]


def write_snapshot(out_dir: str | os.PathLike[str], catalogs: SnapshotCatalogs,
                   formats: Sequence[str] = ("fits", "parquet"), *,
                   checksums: bool = True, grace_seconds: float = 0.2) -> list[Path]:
    """Write one complete snapshot to ``out_dir``, atomically replacing any older one.

    Args:
        out_dir: snapshot directory (created; its parent is created too).
        catalogs: the catalogs; validated (column presence, lengths, ``obs_arr_index`` =
            running sum of ``n_obs``, reference shapes); visits are sorted by visit.
        formats: any of ``"fits"`` (legacy files) and ``"parquet"`` (production files).
        checksums: record the sha256 of each file in ``SNAPSHOT.json`` (one extra read of
            every file).
        grace_seconds: delay before the replaced snapshot is deleted
            (:mod:`streamstars.io.snapshot_directory`).

    Returns:
        Paths (under ``out_dir``) of the files written, the manifest last.

    Raises:
        SnapshotDirectoryError: ``out_dir`` is a symlink, a file, or a directory holding an
            entry that is not in :data:`SNAPSHOT_ENTRIES` (nothing is written or removed).
        SnapshotWriteError: a file could not be written (full disk, permissions, I/O error) or
            the snapshot could not be put in place; the previous snapshot is unchanged and the
            partial files are removed.
        ValueError: invalid catalogs or formats.
    """
    fmts = check_formats(formats)
    cat = normalise_catalogs(catalogs)
    with stage_snapshot(out_dir, grace_seconds=grace_seconds) as staging:
        rows: dict[str, int] = {}
        if "fits" in fmts:
            rows.update(snapshot_fits.write_fits_files(staging.path, cat))
        if "parquet" in fmts:
            rows.update(snapshot_parquet.write_parquet_files(staging.path, cat))
        write_manifest(staging.path, rows, fmts, cat.reference_filters, cat.metadata,
                       checksums=checksums)
    return [staging.target / fname for fname in sorted(rows)] + [staging.target / MANIFEST_NAME]


def read_snapshot(out_dir: str | os.PathLike[str]) -> SnapshotCatalogs:
    """Read a snapshot back (parquet files; the FITS files when no parquet was written).

    All needed files are opened through one directory descriptor before any is read, so a
    concurrent :func:`write_snapshot` cannot make this return a mix of two snapshots.
    Values come back in the in-memory dtypes; parquet stores x, y and magnitudes as float32, so
    those are float32-rounded.  From FITS, ``delta_mag_err_aper`` is NaN and ``obj_flag`` 0
    (the legacy schemas lack them).

    Raises:
        FileNotFoundError: a required file of the snapshot is missing.
    """
    dir_fd = os.open(os.fspath(out_dir), os.O_RDONLY | os.O_DIRECTORY)
    handles: dict[str, IO[bytes]] = {}
    try:
        names = set(os.listdir(dir_fd))
        use_parquet = PARQUET_FILES["stars"] in names
        wanted = PARQUET_FILES if use_parquet else FITS_FILES
        for key, fname in wanted.items():
            if fname not in names:
                if key == "reference" or key == "indices":
                    continue
                raise FileNotFoundError(f"snapshot {out_dir} lacks {fname}")
            fd = os.open(fname, os.O_RDONLY, dir_fd=dir_fd)
            handles[fname] = os.fdopen(fd, "rb")
        return (snapshot_parquet.read_parquet_catalogs(handles) if use_parquet
                else snapshot_fits.read_fits_catalogs(handles))
    finally:
        for handle in handles.values():
            handle.close()
        os.close(dir_fd)


def compare_snapshots(a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str],
                      ignore_metadata_keys: Sequence[str] = ("created",),
                      ignore_manifest_keys: Sequence[str] = ()) -> list[str]:
    """Differences between two snapshot directories (empty list: identical).

    Compares the file sets, every FITS header card and column (bitwise, so NaNs compare
    equal), every parquet schema, column (bitwise) and schema-metadata entry, and the manifests;
    provenance entries named in ``ignore_metadata_keys`` (default: the ``created`` timestamp)
    are ignored, and so are the byte sizes / sha256 of the manifest (they depend on them) and
    its top-level entries named in ``ignore_manifest_keys`` (e.g. ``partitions``).  A HATS
    catalog directory present in both (``fgcm_stars/``) is compared by its rows in ``fgcm_id``
    order, whatever its partitioning (:func:`streamstars.io.hats.compare_catalogs`).
    """
    a, b = Path(a_dir), Path(b_dir)
    names_a, names_b = set(os.listdir(a)), set(os.listdir(b))
    diffs = [f"{name}: only in {a}" for name in sorted(names_a - names_b)]
    diffs += [f"{name}: only in {b}" for name in sorted(names_b - names_a)]
    ignore = tuple(ignore_metadata_keys)
    for name in sorted(names_a & names_b):
        if (a / name).is_dir() and (b / name).is_dir():
            diffs += compare_catalogs(a / name, b / name, ignore)
        elif (a / name).is_dir() or (b / name).is_dir():
            diffs.append(f"{name}: a directory in only one snapshot")
        elif name == MANIFEST_NAME:
            diffs += compare_manifests(a / name, b / name, ignore, tuple(ignore_manifest_keys))
        elif name.endswith(".parquet"):
            diffs += snapshot_parquet.compare_parquet(name, a / name, b / name, ignore)
        elif name.endswith(".fits"):
            diffs += snapshot_fits.compare_fits(name, a / name, b / name, ignore)
        elif (a / name).read_bytes() != (b / name).read_bytes():
            diffs.append(f"{name}: differs")
    return diffs
