"""The memory plan (``bitdance plan``, the worker's KV budget), measured on fake ``cuda`` tensors."""
