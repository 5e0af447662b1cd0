"""The fuzz suite runs a short deterministic profile by default (CI); see fuzz_strategies.fuzz_settings
for the long one."""
