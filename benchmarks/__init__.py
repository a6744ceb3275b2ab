"""Benchmarks: each script compares this project with a peer in the same run; see BENCHMARKS.md."""
