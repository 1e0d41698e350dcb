"""dermkit.exits: early exits for ViTs and CNNs (issues 7 and 22; DYNAMAX, arXiv 2504.20922).

``heads.py`` (linear, MLP, attention-pool and Mamba/SSM exit heads on ViT tokens; pooled
heads on CNN maps) -> ``backbones.py`` (the parts of a ViT or an EfficientNet) ->
``model.py`` (``EarlyExitModel``: a backbone with heads after some blocks) -> ``policy.py``
(confidence measures, ``ExitPolicy``, threshold calibration on val) -> ``infer.py``
(batched inference that drops samples as they leave; GFLOPs per exit) and
``onnx_segments.py`` (one ONNX per segment + an onnxruntime runner). Stages: ``train.py``
(or ``cached.py``: pooled heads on features computed once), ``calibrate.py``,
``bench.py``, ``latency_bench.py``; exit-run folders: ``run_io.py``;
an exit run's ablation-table row: ``summary.py``.
"""
