"""The ``dermkit`` command: one sub-command per stage (console script ``dermkit.cli:app``).

Every stage command takes ``--preset tiny|cpu|gpu``, ``--config FILE`` and trailing
``key=value`` overrides (e.g. ``data.image_size=64 eval.n_boot=200``), and prints where its
report is. Errors in user input exit with status 2 and a message naming the file, row or key.

One module per command group: ``data``, ``train`` (baseline, finetune, compare, distill,
ensemble), ``ssl`` (pretrain mae|vae, probe), ``synth``, ``exits``, ``deploy`` (export,
serve, bench serve|soak|latency), ``evaluate``, ``explain`` (and thickness), ``pipeline``
(run, demo, bench ablation) and ``bench``; ``common`` holds the stage-command factory and
``main`` assembles the app.
"""

from dermkit.cli.main import app

__all__ = ["app"]
