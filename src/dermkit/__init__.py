"""dermkit: skin-lesion classifiers when real data is scarce and badly imbalanced.

Stages (each usable alone, each reads and writes manifests):
data -> synth -> pretrain -> finetune -> distill -> exits -> export/serve,
with evaluate/explain/report after every stage.
"""

__version__ = "0.1.0"
