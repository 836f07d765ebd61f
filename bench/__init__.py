"""Benchmarks behind `make bench`: results as JSON in bench/results, a table on stdout."""
