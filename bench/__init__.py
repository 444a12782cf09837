"""GPU benchmark suite (writes JSON + plots under bench/results/; BENCHMARKS.md quotes it)."""
