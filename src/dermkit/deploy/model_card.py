"""The model card shipped next to every exported model, as a pydantic schema.

One JSON file says what the model is for and how to feed it: class order, the exact
preprocessing (resize, crop, scaling, mean/std, layout), how logits become the reported
probabilities, what data it was trained on, its test metrics with confidence intervals,
the export's numerical parity with PyTorch, intended use and limitations, and that it does
not diagnose. A model trained on dermkit's phantom images says so in ``demo_notice`` (and
``training_data.phantoms``): it is a demo of the toolkit, never a model of real lesions,
and the server and the page repeat the notice with every answer. Every field is required
(no silent defaults), and extra keys are refused, so a card that lost a field fails
validation. :func:`write_card` writes the card and the schema (``model_card.schema.json``,
JSON Schema 2020-12 from pydantic) and validates the written file against the written
schema with ``jsonschema``, so a consumer in another language can check cards without
dermkit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dermkit.data.settings import ColourConstancy, CropPolicy

SCHEMA_VERSION = "1.1"  # 1.1: training_data.phantoms, demo_notice
CARD_FILE = "model_card.json"
SCHEMA_FILE = "model_card.schema.json"

DEMO_NOTICE = (
    "demo model: not for real lesions. It was trained on phantom images drawn by dermkit's "
    "generator, so its answers say nothing about real skin."
)

NOT_A_DIAGNOSIS = (
    "This model does not diagnose. Its output is a statistical estimate from a single "
    "dermoscopic image that may be wrong; it must not replace examination, dermoscopy by a "
    "trained clinician or histopathology, and no treatment decision may rest on it."
)


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Preprocessing(_Card):
    """How an RGB image becomes the model input."""

    image_size: int = Field(description="square side S of the input (px)")
    resize: str = Field(description="how the image is resized before cropping")
    crop: str = Field(description="crop policy")
    crop_policy: CropPolicy = Field(
        "short_side_center",
        description="machine-readable crop policy (dermkit.data.cache.crop_image): "
        "short_side_center or full_frame (long side, reflection-padded square)",
    )
    colour_constancy: ColourConstancy = Field(
        "none",
        description="machine-readable colour constancy applied to the crop "
        "(dermkit.data.cache.crop_image): none or shades_of_gray (p = 6, rounded half up)",
    )
    scale: float = Field(description="uint8 pixel values are multiplied by this (1/255)")
    mean: list[float] = Field(description="per-channel RGB mean subtracted after scaling")
    std: list[float] = Field(description="per-channel RGB std divided by after the mean")
    channel_order: Literal["RGB"]
    input_layout: Literal["NCHW"]
    input_dtype: Literal["float32"]
    input_name: str
    input_shape: list[str | int] = Field(description="['batch', 3, S, S]; batch is dynamic")
    output_name: str
    output: str = Field(description="what the output tensor holds")


class Postprocessing(_Card):
    """Logits -> reported probabilities (the decision rule the run fitted on val)."""

    formula: str
    temperature: float
    class_scales: list[float] | None
    min_recall: dict[str, str | float] | None = Field(
        None,
        description="a minimum-recall operating point folded into class_scales, chosen on val "
        "(class, target recall, factor); the class's probability is then a decision score, "
        "not a calibrated probability",
    )


class MetricEstimate(_Card):
    value: float | None
    ci_low: float | None
    ci_high: float | None


class Parity(_Card):
    """Agreement of an exported file with the PyTorch FP32 model on val images."""

    n_images: int
    max_abs_logit_diff: float
    prediction_agreement: float = Field(description="share of images with the same argmax")


class ModelFile(_Card):
    path: str = Field(description="file name relative to the card")
    format: Literal["onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static-qdq"]
    size_bytes: int
    sha256: str
    parity: Parity


class TrainingData(_Card):
    dataset: str = Field(description="dataset path or name the run was trained on")
    split: str = Field(description="how train/val/test were made")
    images: dict[str, int] = Field(description="images per split")
    lesions: dict[str, int] = Field(description="lesions per split")
    train_class_counts: dict[str, int]
    synthetic: str = Field(description="synthetic training rows, if any")
    phantoms: bool = Field(
        description="true: the images are dermkit phantoms (procedurally drawn), not lesions"
    )


class Evaluation(_Card):
    split: Literal["test"]
    n_images: int
    n_lesions: int
    ci: str = Field(description="how the confidence intervals were computed")
    metrics: dict[str, MetricEstimate]


class ModelCard(_Card):
    """Everything a deployer needs to know about one exported classifier."""

    schema_version: str
    name: str
    created: str
    dermkit_version: str
    source_run: str
    architecture: str
    parameters: int
    pretrained_weights: dict[str, str] | None = Field(
        None,
        description="initial weights shipped inside a package: source, package, version, file, "
        "sha256, licence (null: random or local initialisation)",
    )
    classes: list[str] = Field(description="class names in output (logit) order")
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    files: list[ModelFile]
    training_data: TrainingData
    evaluation: Evaluation
    intended_use: str
    limitations: list[str]
    not_a_diagnosis: str
    demo_notice: str | None = Field(
        description="set (DEMO_NOTICE) when trained on phantom images: a demo model, not "
        "for real lesions; null for models of real data"
    )


def card_schema() -> dict:
    """The JSON Schema (2020-12) of :class:`ModelCard`."""
    schema = ModelCard.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def validate_card_json(card: dict, schema: dict) -> None:
    """Raise ``jsonschema.ValidationError`` (naming the field) if ``card`` breaks ``schema``."""
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(card, schema, cls=jsonschema.Draft202012Validator)


def write_card(card: ModelCard, out_dir: str | Path) -> Path:
    """Write ``model_card.json`` and ``model_card.schema.json``; validate the written pair."""
    out_dir = Path(out_dir)
    card_path, schema_path = out_dir / CARD_FILE, out_dir / SCHEMA_FILE
    schema_path.write_text(json.dumps(card_schema(), indent=2))
    card_path.write_text(card.model_dump_json(indent=2))
    validate_card_json(json.loads(card_path.read_text()), json.loads(schema_path.read_text()))
    return card_path
