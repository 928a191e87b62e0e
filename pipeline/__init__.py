"""Offline encoding of an image folder into a feature cache (``python -m pipeline.build``)."""
