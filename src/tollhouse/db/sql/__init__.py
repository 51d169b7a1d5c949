"""SQL of the database layer itself."""
