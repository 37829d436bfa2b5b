"""Benchmarks for infermesh: load generators, baselines and the one-shot ``run_all`` report.

Nothing in ``services/`` imports this package; it only measures the mesh from the outside
(HTTP, Open Inference Protocol v2) and the baselines it is compared against.
"""
