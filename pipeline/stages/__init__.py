"""One module per stage of a round; each writes parquet + a manifest under the run dir."""
