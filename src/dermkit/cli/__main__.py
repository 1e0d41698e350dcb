"""``python -m dermkit.cli``: the same app as the ``dermkit`` console script."""

from dermkit.cli import app

if __name__ == "__main__":  # pragma: no cover
    app()
