"""Orchestration: each stage is one module with one entry function taking a typed config and a
run directory and returning the URIs it wrote. This is the only layer that may use Ray."""
