"""Grouping plugins: Features -> Slots. One module per grouping."""
