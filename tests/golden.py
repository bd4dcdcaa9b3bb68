"""Digests of the *data* of a snapshot, to compare catalogs across code changes.

A digest covers every column of every output file (name, type and the bytes of its values)
and every header card / schema-metadata entry that describes data — not the provenance
(``SSPROV``, ``SSVERSN``, the parquet ``streamstars`` metadata, the manifest), which records
versions, times and configuration keys that may legitimately change.  Two snapshots with equal
digests hold byte-identical data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

#: header cards that record provenance or file structure, not data
_PROVENANCE_CARDS = frozenset({"SSPROV", "SSVERSN", "CHECKSUM", "DATASUM", "DATE", "CONTINUE"})
_PROVENANCE_METADATA = frozenset({b"streamstars", b"ARROW:schema", b"pandas"})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _array_digest(array: pa.ChunkedArray | pa.Array) -> str:
    values = array.to_numpy(zero_copy_only=False)
    if values.dtype == object:
        return _sha(json.dumps([v.tolist() if isinstance(v, np.ndarray) else v
                                for v in values], sort_keys=True, default=str).encode())
    return _sha(np.ascontiguousarray(values).tobytes())


def _parquet_digest(path: Path) -> dict[str, str]:
    table = pq.read_table(path)
    out = {f"column:{field.name}": f"{field.type}:{_array_digest(table.column(field.name))}"
           for field in table.schema}
    for key, value in sorted((table.schema.metadata or {}).items()):
        if key not in _PROVENANCE_METADATA:
            out[f"metadata:{key.decode()}"] = _sha(value)
    return out


def _fits_digest(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with fits.open(path) as hdus:
        for index, hdu in enumerate(hdus):
            cards = [(card.keyword, str(card.value)) for card in hdu.header.cards
                     if card.keyword not in _PROVENANCE_CARDS]
            out[f"hdu{index}:header"] = _sha(json.dumps(cards).encode())
            if isinstance(hdu, fits.BinTableHDU):
                for name in hdu.columns.names:
                    column = np.ascontiguousarray(hdu.data[name])
                    out[f"hdu{index}:column:{name}"] = \
                        f"{column.dtype.str}:{_sha(column.tobytes())}"
    return out


def snapshot_digest(out_dir: Path) -> dict[str, dict[str, str]]:
    """file name -> {part -> digest} for every FITS and parquet file of a snapshot."""
    digest: dict[str, dict[str, str]] = {}
    for path in sorted(out_dir.iterdir()):
        if path.suffix == ".parquet":
            digest[path.name] = _parquet_digest(path)
        elif path.suffix == ".fits":
            digest[path.name] = _fits_digest(path)
    return digest


def digest_differences(expected: dict[str, dict[str, str]],
                       actual: dict[str, dict[str, str]]) -> list[str]:
    """Human-readable differences between two snapshot digests (empty: identical data)."""
    diffs = [f"{name}: missing" for name in sorted(set(expected) - set(actual))]
    diffs += [f"{name}: unexpected" for name in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        for part in sorted(set(expected[name]) | set(actual[name])):
            if expected[name].get(part) != actual[name].get(part):
                diffs.append(f"{name} {part}: expected {expected[name].get(part)}, "
                             f"got {actual[name].get(part)}")
    return diffs
