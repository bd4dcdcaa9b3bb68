"""What a band name may be: the store keys every band in a fixed 8-byte ASCII prefix.

Band names reach the store from visit metadata (``band``), from ``physicalFilterMap`` and from
``primaryBands``; each is checked here before anything is written, so that a name that cannot
be stored is refused with a message naming it (a visit fails alone, a configuration is refused
at load) instead of aborting a run half-way.
"""

from __future__ import annotations

#: Width of the band prefix of the store's keys (``state.store.band_key``).
BAND_KEY_BYTES = 8


def band_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a band name of the store, or ``None`` when it can.

    A band name is a non-empty string of at most :data:`BAND_KEY_BYTES` printable ASCII
    characters (``' '`` to ``'~'``): keys pad it with NUL bytes, so neither non-ASCII text nor
    control characters would survive the round trip.
    """
    if not isinstance(name, str):
        return f"a band name must be a string, not {type(name).__name__}"
    if not name:
        return "the band name is empty"
    if not all(" " <= ch <= "~" for ch in name):
        return ("a band name must be printable ASCII (the store keys bands in "
                f"{BAND_KEY_BYTES} ASCII bytes)")
    if len(name) > BAND_KEY_BYTES:
        return f"a band name may have at most {BAND_KEY_BYTES} characters, this one has {len(name)}"
    return None
