"""The benchmark scripts, shipped with the package (``stdit.benchmarks``) so ``stdit bench NAME`` runs them installed."""
