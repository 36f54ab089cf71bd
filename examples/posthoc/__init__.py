"""PostHocEMA on scikit-learn's digits: one run, the EMA width chosen afterwards (``python -m examples.posthoc``)."""
