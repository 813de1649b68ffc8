"""Benchmarks behind `soda bench`: they print numbers; tests never time anything."""
