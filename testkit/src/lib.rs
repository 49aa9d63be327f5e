//! Network-namespace topologies for tests and benchmarks.
