"""Data layer: readers -> one Manifest table, validation, splits, image cache, phantoms."""
