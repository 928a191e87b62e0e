"""Benchmarks: each measures a stage against its own limit in the same run (``python -m tools.bench.cache``, ``.train``, ``.sample``)."""
