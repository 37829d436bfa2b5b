"""The model registry: models, immutable versions, content-addressed artifacts."""
