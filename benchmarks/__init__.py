"""Speed and memory benchmarks of facefed, one module per topic (bench_*.py)."""
