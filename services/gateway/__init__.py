"""The gateway: the common API (Open Inference Protocol v2), validation, request ids."""
