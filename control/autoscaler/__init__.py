"""The autoscaler: batcher load in, desired worker replicas per model version out."""
