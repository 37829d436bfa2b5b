"""Guarded rollouts: compare a canary with its baseline; roll back or advance on the figures."""
