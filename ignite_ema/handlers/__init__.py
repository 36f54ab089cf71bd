"""The Ignite adapters: handlers that turn an engine's events and iterations into calls of the framework-free core.

- :mod:`ignite_ema.handlers.ema_handler`: :class:`EMAHandler`, over :class:`~ignite_ema.ModelEMA`.
- :mod:`ignite_ema.handlers.bn_recalibration`: :class:`BNRecalibration`, over :func:`~ignite_ema.recalibrate_bn`.
- :mod:`ignite_ema.handlers._engine`: what the handlers do alike with an engine (attach once, the clock across runs).

The public names are importable from :mod:`ignite_ema` itself.
"""
