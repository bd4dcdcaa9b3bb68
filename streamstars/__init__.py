"""streamstars: incremental builder of the fgcm star catalogs."""

__version__ = "0.1.0"
