"""Where the Cython extensions built from ``_speedups/*.pyx`` land (see engine.speedups)."""
