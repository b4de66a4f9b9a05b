"""
Benchmarks for quayfront (not tests: pytest does not collect them).

``python -m tests.bench`` (or ``make bench``) runs them all and prints a report.
"""
