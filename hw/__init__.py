"""Hardware detection and microbenchmarks (CPU, GPUs, Jetson, Apple silicon)."""
