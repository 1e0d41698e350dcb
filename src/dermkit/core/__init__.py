"""Lowest layer: helpers every other package may use (atomic files, hashing, metrics,
the predictions-file format, devices and precision, extras).

Nothing here imports another dermkit package (``tests/test_layers.py`` checks it).
"""
