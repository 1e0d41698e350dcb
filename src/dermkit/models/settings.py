"""Model settings: which network (and from which weights), and the classical baseline model.

What belongs here: pydantic schemas of model architectures and their initialisation
(``models/backbones.py``, ``models/weights.py``, ``models/packaged.py``) and of the
colour/texture gradient-boosting model (``models/classical.py``). Schemas only (see
``dermkit.config``); settings modules are read at every layer (``tests/test_layers.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dermkit.config import Strict


class ModelConfig(Strict):
    """Which network, initialised from where."""

    name: str = Field("vit_tiny_patch8_64", description="dermkit variant or any timm name")
    weights: str | None = Field(
        None,
        description="local .safetensors/.pth file, dermkit run folder, or a weights file "
        "shipped inside an installed package: 'imagenet' / 'pkg:<name>' "
        "(models/packaged.py); never a hub",
    )
    input_norm: Literal["auto", "imagenet", "symmetric"] = Field(
        "auto",
        description="input normalisation: imagenet mean/std or symmetric [-1, 1] (TF-Lite); "
        "auto = the weights source's own (packaged source or run folder), else imagenet",
    )
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    drop_rate: float = Field(0.0, ge=0, lt=1)


class BaselineConfig(Strict):
    """Colour + texture features with class-balanced gradient boosting."""

    color_bins: int = Field(16, ge=4)
    lbp_radii: list[int] = Field(default_factory=lambda: [1, 2, 3])
    max_iter: int = Field(400, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    max_leaf_nodes: int = Field(31, ge=2)
    l2_regularization: float = Field(1.0, ge=0)
    class_balanced: bool = True
    tune_priors_on_val: bool = Field(
        True, description="rescale class probabilities to maximise val macro-F1 (never test)"
    )
    metadata: list[str] = Field(
        default_factory=list,
        description="manifest columns added as features, e.g. [age, sex, localization]",
    )
