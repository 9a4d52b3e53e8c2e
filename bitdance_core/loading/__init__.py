"""Checkpoint I/O shared by the families: layouts, quantisation, pre-quantised checkpoints."""
