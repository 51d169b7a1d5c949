"""Forward-only numbered SQL migrations: `NNNN_name.sql`, applied in order, never edited."""
