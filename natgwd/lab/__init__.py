"""The seed topology in network namespaces, for the demo, the tests and the benchmarks."""
