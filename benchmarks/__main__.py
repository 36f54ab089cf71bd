"""``python -m benchmarks``: run :func:`benchmarks.ema_bench.main`."""

from benchmarks.ema_bench import main

raise SystemExit(main())
