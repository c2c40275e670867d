"""GPU benchmarks and device checks (run on the lent GPU; not part of `make test`)."""
