"""The batcher: per-(model, version) queues, dynamic batching, dispatch to workers."""
