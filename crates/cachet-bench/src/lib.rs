//! Benchmarks for cachet; see `benches/`.
