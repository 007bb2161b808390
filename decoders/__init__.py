"""Decoder plugins: Slots (+ Features, Batch) -> Decoding. One module per decoder."""
