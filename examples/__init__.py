"""Runnable examples built on ignite_ema (``python -m examples.<name>``)."""
