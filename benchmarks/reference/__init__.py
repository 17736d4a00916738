"""Reference implementations, written the straightforward way from the spec, for benchmarks and tests."""
