"""Speed benchmarks of the certification engine and the Ray pipeline (see BENCHMARKS.md)."""
