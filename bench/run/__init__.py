"""Running: config, the plugin registry, composition, training, evaluation, grids, the
results store, checkpoints and importing. Imports ocl_bench.api, never ocl_bench.report."""
