"""Benchmarks that put ndlowrank side by side with its peers; see RESULTS.md."""
