"""Adding a training method to dermkit: rotation prediction (Gidaris et al., ICLR 2018).

The worked example of README.md "Architecture": a self-supervised method is a ``step`` and
an ``evaluate``; ``train.engine.fit`` owns the loop (schedule, accumulation, EMA, clipping,
DDP slices, resume, logging, checkpoints). Run it: ``python examples/rotation_method.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from dermkit.train.engine import Batch, EpochEnd, Rows, fit, make_accelerator
from dermkit.train.settings import OptimConfig


class RotationPrediction:
    """Predict which of 0/90/180/270 degrees an image was turned by.

    images: (N, 3, S, S) float tensor, the whole training set in memory for the example.
    """

    select = "val_accuracy"  # the evaluate() key whose best epoch is kept

    def __init__(self, images: torch.Tensor, val_images: torch.Tensor):
        self.images, self.val_images = images, val_images

    def step(self, model, batch: Batch):
        """One micro-batch: (scalar loss, logs). Randomness comes from ``batch.gen``."""
        x = self.images[torch.as_tensor(batch.rows)]
        # Drawn for the whole global batch, then sliced: 2 processes draw what 1 does.
        k_all = batch.once("k", lambda: torch.randint(4, (batch.size,), generator=batch.gen))
        k = k_all[batch.offset : batch.offset + len(batch.rows)]
        x = torch.stack([torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(x, k)])
        logits = model(x)
        loss = F.cross_entropy(logits, k)
        return loss, {"accuracy": float((logits.argmax(1) == k).float().mean())}

    @torch.no_grad()
    def evaluate(self, model, end: EpochEnd):
        """The epoch's history row: rotation accuracy on the val images."""
        model.eval()
        k = torch.arange(len(self.val_images)) % 4
        x = torch.stack([torch.rot90(v, int(r), dims=(-2, -1)) for v, r in zip(self.val_images, k)])
        accuracy = float((model(x).argmax(1) == k).float().mean())
        model.train()
        return {"epoch": end.epoch, "train_loss": end.train_loss, "val_accuracy": accuracy}


def main() -> None:
    torch.manual_seed(0)
    # Images with an orientation to find: a bright top-left quadrant.
    images = torch.rand(256, 3, 32, 32) * 0.3
    images[:, :, :16, :16] += 0.7
    model = timm.create_model("resnet10t", num_classes=4)
    optim = OptimConfig(epochs=8, batch_size=32, base_lr=4e-3, warmup_epochs=0.5)
    with tempfile.TemporaryDirectory() as run_dir:
        _state, model = fit(
            RotationPrediction(images[:224], images[224:]),
            model,
            Rows.of(224),
            optim,
            Path(run_dir),
            seed=0,
            accelerator=make_accelerator("fp32"),
            progress=False,
        )
        print((Path(run_dir) / "log.jsonl").read_text().splitlines()[-1])


if __name__ == "__main__":
    main()
