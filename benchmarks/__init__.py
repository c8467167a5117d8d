"""Side-by-side benchmarks of unidask against what users do today and the machine's limits.
Run ``python -m benchmarks [--quick] [--json FILE]`` from the repository root."""
