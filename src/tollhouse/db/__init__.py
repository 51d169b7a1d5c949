"""The database layer: the embedded server, the pool, named queries and migrations."""
