"""Guarded rollouts: compare a canary with its baseline and roll back (or advance) on the figures."""
