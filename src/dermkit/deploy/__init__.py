"""dermkit.deploy: ONNX export + INT8 quantisation with parity checks and a model card
(``export.py``, ``model_card.py``), and teacher-vs-student latency (``latency.py``)."""
