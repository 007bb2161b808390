"""One TOML per evaluation protocol (ocl_bench.protocols reads them; shipped in the wheel)."""
