"""Data sources of the workloads."""
