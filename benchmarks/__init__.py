"""Throughput benchmarks; installed as `sparsegps.benchmarks`, each module also runs alone."""
