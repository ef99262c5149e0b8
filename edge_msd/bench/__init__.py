"""On-device benchmark harness: runtimes, timing, memory, power, recall, reports.

Imports only the standard library, numpy and the runtime in use (never torch): this package ships
inside the benchmark binary (``tools/build_bench.py`` → ``edge-msd-bench.pyz``).
"""
