"""Lowest layer: helpers every other package may use (atomic files, hashing, metrics, extras).

Nothing here imports another dermkit package (``tests/test_layers.py`` checks it).
"""
