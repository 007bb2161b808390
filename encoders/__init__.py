"""Encoder plugins: Batch -> Features. One module per encoder family."""
