"""One TOML per published table and the embedded demo grid (shipped inside the wheel)."""
