"""The fuzz suite (hostile GGUF headers, metadata values, tensor tables and saved files).

In CI each property runs a short deterministic profile (derandomized, a few seconds). A longer,
random run, with the outcome counts written as JSON:

    FUZZ_EXAMPLES=2000 FUZZ_STATS=fuzz-stats.json python -m pytest -q -p no:cacheprovider tests/fuzz

Every example must work or end in one of our own errors with a one-line, printable, bounded
message, allocate under 256 MiB (tracemalloc) and finish inside a generous hang guard.
"""
