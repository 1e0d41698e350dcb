"""Frozen feature networks for synthesis: dermkit domain encoders, and VGG/Inception from files.

The perceptual loss of the autoencoder and the quality metrics (Fréchet distance, KID,
precision/recall, memorisation) all need a feature space. ImageNet networks (VGG for
LPIPS, Inception for FID) cannot be downloaded on the build machines, so the default is a
*dermkit encoder*: the backbone of any dermkit run folder (``finetune``, an MAE run...),
rebuilt with ``create_backbone`` and filled with ``load_pretrained``. VGG-16 and
Inception-v3 are supported only from local files of torchvision state dicts
(``.safetensors``, or a torch file read with ``weights_only=True``: never a pickle).

Every extractor takes images in [0, 1] as (B, 3, H, W) float and resizes them to the
network's own input size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from torch import nn

from dermkit.data.transforms import normalize

log = logging.getLogger(__name__)

# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's vgg16().features: LPIPS's taps.
VGG16_TAPS = (3, 8, 15, 22, 29)


class EncoderError(ValueError):
    """A feature network cannot be built from the given run folder or file."""


def _nested(cfg: dict, *paths: str):
    """First value found at one of the dotted ``paths`` of a config dict, else None."""
    for path in paths:
        node = cfg
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def encoder_spec(run: str | Path) -> tuple[str, int, Path]:
    """(backbone name, img_size, weights file) of a dermkit run folder.

    The weights file's ``dermkit_name``/``dermkit_img_size`` metadata (written by
    ``save_weights``) wins; otherwise the run's ``config.yaml`` (``model.name`` or
    ``encoder.name``, and ``data.image_size``).
    """
    from dermkit.models.weights import resolve_source

    run = Path(run)
    if not run.is_dir():
        raise EncoderError(f"encoder run folder not found: {run}")
    weights = resolve_source(run)
    meta: dict = {}
    if weights.suffix == ".safetensors":
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    cfg: dict = {}
    if (run / "config.yaml").exists():
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    name = meta.get("dermkit_name") or _nested(cfg, "model.name", "encoder.name", "mae.encoder")
    size = meta.get("dermkit_img_size") or _nested(cfg, "data.image_size", "image_size")
    if name is None or size is None:
        raise EncoderError(
            f"{run}: cannot tell the backbone: neither {weights.name} metadata "
            "(dermkit_name, dermkit_img_size) nor config.yaml (model.name, data.image_size) "
            "names it"
        )
    return str(name), int(size), weights


def load_domain_encoder(run: str | Path) -> nn.Module:
    """The frozen backbone (no head, eval mode) of a dermkit run folder.

    The model keeps timm's interface; ``model.dermkit_spec['img_size']`` is its input side.
    Raises EncoderError when the folder's weights fill none of the backbone's tensors.
    """
    from dermkit.models.backbones import create_backbone
    from dermkit.models.weights import load_pretrained

    name, size, weights = encoder_spec(run)
    model = create_backbone(name, num_classes=0, img_size=size)
    report = load_pretrained(model, weights)
    if report.loaded == 0:
        raise EncoderError(f"{weights}: no tensor matches backbone {name!r}:\n{report}")
    if not report.ok:
        log.warning("encoder %s partly loaded: %s", run, report)
    return model.eval().requires_grad_(False)


def _fit(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, 3, H, W) to (B, 3, size, size) when needed (bilinear, antialiased)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def encoder_input(x01: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> the encoder's normalised input (B, 3, S, S)."""
    return normalize(_fit(x01, encoder.dermkit_spec["img_size"]).clone())


def encoder_intermediates(encoder: nn.Module, x01: torch.Tensor, n: int = 4) -> list[torch.Tensor]:
    """Up to ``n`` evenly spaced feature maps [(B, C_i, H_i, W_i)] (timm forward_intermediates)."""
    depth = len(encoder.feature_info)
    idx = sorted(set(np.linspace(0, depth - 1, min(n, depth)).round().astype(int).tolist()))
    return encoder.forward_intermediates(
        encoder_input(x01, encoder), indices=idx, intermediates_only=True
    )


def encoder_pooled(encoder: nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """Pooled features (B, D) of images in [0, 1]: ``forward_head(..., pre_logits=True)``."""
    feats = encoder.forward_features(encoder_input(x01, encoder))
    return encoder.forward_head(feats, pre_logits=True)


def _state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local .safetensors or torch (weights_only) file; never a pickle."""
    from dermkit.models.weights import read_checkpoint, unwrap_checkpoint

    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"weights file not found: {path}")
    return unwrap_checkpoint(read_checkpoint(path), path, [])


class VGG16Features(nn.Module):
    """torchvision VGG-16 ``features`` from a local state dict; returns the LPIPS taps.

    Keys may be ``0.weight`` (a ``features`` state dict) or ``features.0.weight`` (the whole
    vgg16). forward: images in [0, 1] (B, 3, H, W) -> 5 maps [(B, C_i, H_i, W_i)].
    """

    def __init__(self, path: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features[: VGG16_TAPS[-1] + 1]
        state = _state_dict_file(path)
        state = {k.removeprefix("features."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k in self.features.state_dict()}
        missing = sorted(set(self.features.state_dict()) - set(state))
        if missing:
            raise EncoderError(
                f"{path}: not a torchvision vgg16 features state dict (missing {missing[:4]})"
            )
        self.features.load_state_dict(state)
        self.eval().requires_grad_(False)

    def forward(self, x01: torch.Tensor) -> list[torch.Tensor]:
        x, out = normalize(x01.clone()), []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out


class InceptionPool(nn.Module):
    """torchvision Inception-v3 from a local state dict; (B, 3, H, W) in [0, 1] -> (B, 2048).

    This is torchvision's ImageNet Inception, not the TF "pt_inception-2015-12-05" graph of
    published FIDs, so values are comparable only with other dermkit runs.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        state = {k: v for k, v in _state_dict_file(path).items() if not k.startswith("AuxLogits")}
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise EncoderError(f"{path}: not a torchvision inception_v3 state dict: {e}") from e
        self.net.fc = nn.Identity()
        self.eval().requires_grad_(False)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(_fit(x01, 299).clone()))


FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def extract_features(
    fn: FeatureFn, images: np.ndarray, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """Apply ``fn`` (images in [0, 1] -> (B, D)) to uint8 images (N, S, S, 3): (N, D) float32."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        x = x.permute(0, 3, 1, 2).to(device).float().div_(255)
        out.append(fn(x).float().flatten(1).cpu())
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()


def describe_encoder(run: str | Path) -> str:
    """One line naming a run folder's backbone, for reports."""
    name, size, weights = encoder_spec(run)
    return json.dumps({"backbone": name, "img_size": size, "weights": str(weights)})
