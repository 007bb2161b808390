"""Objective plugins: ModelOutput + Batch -> named scalar losses."""
