//! Integration tests and benchmarks of credlet (in progress).
