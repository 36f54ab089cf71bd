"""Post-hoc EMA (Karras et al., EDM2): power-function EMAs and their snapshots, then an EMA of any length from them.

- :mod:`ignite_ema.posthoc.power`: the math (sigma_rel and gamma, the power EMA's momentum, the least-squares
  weights of a reconstruction).
- :mod:`ignite_ema.posthoc.snapshots`: the snapshot files: writing, listing, loading, checking they fit a model.
- :mod:`ignite_ema.posthoc.reconstruct`: an EMA of any sigma_rel from the snapshots.
- :mod:`ignite_ema.posthoc.core`: :class:`PostHocEMA`, the EMAs of a training run and their snapshots, in a plain
  loop (``update(step=...)``). None of the modules above imports Ignite.
- :mod:`ignite_ema.posthoc.handler`: the Ignite adapter that ``PostHocEMA.attach(engine)`` loads.

The public names are importable from :mod:`ignite_ema` itself.
"""
