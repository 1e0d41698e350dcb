"""Pipelines: a cached DAG of stages (``dermkit run PIPELINE.yaml``).

* :mod:`~dermkit.pipeline.runner`: the DAG runner: stage keys, caching, resume, state. It
  imports no domain code; it is given the stages.
* :mod:`~dermkit.pipeline.dermae`: the DerMAE pipeline: its file's schema, its stages (each
  the function its ``dermkit`` command calls) and what feeds what.
* :mod:`~dermkit.pipeline.report`: the summary ``report.html`` of a DerMAE pipeline run.

Import from the modules: this package's ``__init__`` stays empty so that the runner can be
imported without the stages.
"""
