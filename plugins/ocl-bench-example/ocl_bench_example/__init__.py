"""Example ocl-bench plugins, installed as their own distribution."""
