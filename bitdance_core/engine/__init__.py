"""The batching engine (torch) and its torch-free protocol and scheduler."""
