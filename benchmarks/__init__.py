"""Benchmarks of the EMA update: scripts, not tests. Run ``tox -e bench`` or ``python -m benchmarks --help``."""
