"""Micro-benchmarks (`s4v bench ...`)."""
