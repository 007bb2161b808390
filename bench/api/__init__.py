"""What a plugin author imports: the typed stage outputs (contracts), the plugin base classes
(plugin, tasking, tokenizing), params, hookspecs, errors, and the shared operations plugins
use (matching, layers, drawing, runtime, weights, diffusion).

Nothing here imports ocl_bench.run or ocl_bench.report (tests/test_layering.py).
"""
