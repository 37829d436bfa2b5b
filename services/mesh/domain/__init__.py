"""The domain layer: types, tensors, errors, tenancy, the catalog, the config view and the
next-hop protocols. Imports the standard library and numpy only (checked by
tests/test_layers.py)."""
