"""Self-supervised domain pretraining: encoders learned from unlabelled lesion images.

- ``mae.py``: masked autoencoder on a timm ViT (the encoder sees only visible patches).
- ``vae.py``: convolutional VAE whose encoder is the ``vae_encoder_*`` backbone.
- ``pretrain.py``: the ``dermkit pretrain mae|vae`` loop, checkpoints, grids, probe, export.
"""
