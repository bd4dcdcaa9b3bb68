"""Input readers: source tables, visit metadata, reference catalogs."""
