"""Sound event detection with a mean teacher: reproduce the EMA-teacher F1 regression and compare buffer modes."""
