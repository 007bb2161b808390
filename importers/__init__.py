"""Checkpoint importer plugins: one module per official checkpoint format."""
