"""Worker backends: the `Backend` protocol (base.py) and its implementations (torchscript.py).

Nothing is imported here, so that the worker core can use the protocol without importing torch.
"""
