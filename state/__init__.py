"""The LMDB-backed star store (installed as ``streamstars.state``)."""
