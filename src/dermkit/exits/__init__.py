"""dermkit.exits: early exits for dermkit ViTs (issue 7; DYNAMAX, arXiv 2504.20922).

``heads.py`` (linear, MLP, attention-pool and Mamba/SSM exit heads) -> ``model.py``
(``EarlyExitViT``: a timm ViT with heads after some blocks) -> ``policy.py`` (confidence
measures, ``ExitPolicy``, threshold calibration on val) -> ``infer.py`` (batched inference
that drops samples as they leave; GFLOPs per exit) and ``onnx_segments.py`` (one ONNX per
segment + an onnxruntime runner). Stages: ``train.py``, ``calibrate.py``, ``bench.py``;
exit-run folders: ``run_io.py``;
an exit run's ablation-table row: ``summary.py``.
"""
