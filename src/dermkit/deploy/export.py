"""``dermkit export``: a classifier run -> ONNX FP32 (+ INT8) with parity figures and a model card.

* ONNX via ``torch.onnx.export(..., dynamo=True)``, torch's maintained exporter (the
  TorchScript one is deprecated), with a dynamic batch axis. Input: normalised float32
  (B, 3, S, S) in NCHW RGB (preprocessing stays outside the graph, written in the card);
  output: logits (B, C).
* Parity: ONNX Runtime vs the PyTorch FP32 model on val images: max |logit difference|
  and argmax agreement, for every file.
* INT8 with ``onnxruntime.quantization``: ``dynamic`` (weights INT8, activations quantised
  per batch at run time; no calibration) and ``static`` QDQ (weights and activations INT8,
  activation ranges calibrated on N val images through a ``CalibrationDataReader``).
  Only MatMul/Gemm/Conv are quantised: they hold the weights and the time, while INT8
  softmax, layer norm or GELU inputs cost accuracy for little speed.
* ``export.json`` (parity, sizes, timings of the export) and ``model_card.json`` +
  ``model_card.schema.json`` (see ``model_card.py``); the run's ``ood.json`` (the
  unfamiliar-image flag of ``dermkit evaluate RUN --fit-ood``) when it has one.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from dermkit import __version__
from dermkit.core.files import sha256_file
from dermkit.core.onnx import cpu_session
from dermkit.data.phantoms import is_phantom_dataset
from dermkit.data.transforms import to_float
from dermkit.deploy.model_card import (
    DEMO_NOTICE,
    NOT_A_DIAGNOSIS,
    SCHEMA_VERSION,
    Evaluation,
    MetricEstimate,
    ModelCard,
    ModelFile,
    Parity,
    Postprocessing,
    Preprocessing,
    TrainingData,
    write_card,
)
from dermkit.models.backbones import input_stats

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
FP32_FILE = "model.onnx"
INT8_FILES = {"dynamic": "model.int8-dynamic.onnx", "static": "model.int8-static.onnx"}
INT8_FORMATS = {"dynamic": "onnx-int8-dynamic", "static": "onnx-int8-static-qdq"}
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
# Static INT8 also quantises the activations that follow a conv (ReLU6 exports as Clip). Left
# out, the conv's output is calibrated over its whole pre-activation range (say -40..40) and
# the values the Clip keeps (0..6) get a few of the 256 levels. With them in, ORT folds the
# activation into the conv's output range: on EfficientNet-Lite0 (ImageNet head, 200
# HAM10000 images at 128 px) INT8/FP32 top-1 agreement rose from 0.47 to 0.87.
STATIC_QUANTIZED_OPS = [*QUANTIZED_OPS, "Clip", "Relu"]


# ----------------------------------------------------------------------------- ONNX


@contextmanager
def _quiet_logs(*names: str):
    """Mute INFO chatter of the ONNX tool chain: the quantiser logs one line per tensor on
    the root logger ("") and the exporter's graph passes log on onnxscript / onnx_ir."""
    loggers = [logging.getLogger(name or None) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: torch.nn.Module, image_size: int, path: str | Path) -> Path:
    """Write ``model`` as ONNX: input ``image`` (batch, 3, S, S) float32 -> ``logits``.

    The batch axis is dynamic; the model is exported in eval mode on CPU in FP32.
    """
    path = Path(path)
    model = model.float().cpu().eval()
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), _quiet_logs("onnxscript", "onnx_ir"):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,  # one self-contained file for the browser/phone
            verbose=False,
        )
    return path


def run_onnx(session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits (N, C) of normalised float32 images (N, 3, S, S), in batches."""
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: images[i : i + batch_size]})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """PyTorch FP32 logits (N, C) of normalised float32 images (N, 3, S, S)."""
    model = model.float().cpu().eval()
    with torch.no_grad():
        out = [
            model(torch.from_numpy(images[i : i + batch_size])).numpy()
            for i in range(0, len(images), batch_size)
        ]
    return np.concatenate(out)


def parity(reference: np.ndarray, other: np.ndarray) -> dict:
    """Max |logit difference| and argmax agreement of (N, C) logits against a reference."""
    return {
        "n_images": len(reference),
        "max_abs_logit_diff": float(np.abs(reference - other).max()),
        "prediction_agreement": float((reference.argmax(1) == other.argmax(1)).mean()),
    }


# ----------------------------------------------------------------------------- INT8


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches {input name: (b, 3, S, S) float32} to ONNX Runtime."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 16):
        self.batches = iter(
            [{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _preprocessed(fp32_path: Path, work: Path) -> Path:
    """ORT's recommended pre-step (shape inference + graph optimisation) before quantising."""
    out = work / "model.preprocessed.onnx"
    if not out.exists():
        quant_pre_process(str(fp32_path), str(out))
    return out


def quantize_int8_dynamic(fp32_path: Path, out_path: Path) -> Path:
    """INT8 weights, activations quantised on the fly; no calibration data needed."""
    pre = _preprocessed(fp32_path, out_path.parent)
    quantize_dynamic(
        str(pre), str(out_path), op_types_to_quantize=QUANTIZED_OPS, weight_type=QuantType.QInt8
    )
    return out_path


def quantize_int8_static(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """QDQ INT8 weights (per channel) and activations, ranges from ``calibration`` images.

    calibration: normalised float32 images (N, 3, S, S), e.g. val images.
    """
    pre = _preprocessed(fp32_path, out_path.parent)
    quantize_static(
        str(pre),
        str(out_path),
        ImageCalibrationReader(INPUT_NAME, calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=STATIC_QUANTIZED_OPS,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out_path


# ----------------------------------------------------------------------------- the run


def _run_data(run_dir: Path, cfg):
    """The run's prepared data, split exactly as the run split it (its split.csv)."""
    from dermkit.data.prepare import prepare_data

    data_cfg = cfg.data
    if (run_dir / "split.csv").exists():
        data_cfg = data_cfg.model_copy(update={"split_file": str(run_dir / "split.csv")})
    return prepare_data(data_cfg)


def _training_data(data, cfg) -> TrainingData:
    m = data.manifest
    real = m[~m["synthetic"].astype(bool)]
    train = data.part("train")
    syn = int(train["synthetic"].astype(bool).sum())
    split = (
        f"split file {cfg.data.split_file}"
        if cfg.data.split_file
        else f"label-stratified, lesion-grouped {cfg.data.train}/{cfg.data.val}/{cfg.data.test}, "
        f"seed {cfg.data.split_seed}"
    )
    return TrainingData(
        dataset=str(cfg.data.path),
        split=split,
        images={s: int((real["split"] == s).sum()) for s in ("train", "val", "test")},
        lesions={
            s: int(real.loc[real["split"] == s, "lesion_id"].nunique())
            for s in ("train", "val", "test")
        },
        train_class_counts={
            c: int(n)
            for c, n in train.loc[~train["synthetic"].astype(bool), "label"]
            .value_counts()
            .reindex(data.classes, fill_value=0)
            .items()
        },
        synthetic=(
            f"{syn} synthetic rows from {cfg.synthetic_manifest}, ratio {cfg.synthetic_ratio}"
            if syn
            else "none"
        ),
        phantoms=is_phantom_dataset(cfg.data.path),
    )


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    int8: str | None = "both",
    n_parity: int = 512,
    n_calibration: int = 64,
) -> dict:
    """Export a classifier run folder; returns the ``export.json`` content.

    Args:
        run_dir: a ``dermkit finetune`` / ``distill`` run folder.
        out_dir: where model.onnx, INT8 files, export.json and the model card go.
        int8: "dynamic", "static", "both" or None (FP32 only).
        n_parity: val images used for the parity figures (at most all of val).
        n_calibration: val images that calibrate the static INT8 activation ranges.
    """
    from dermkit.data.dataset import CachedImageDataset
    from dermkit.models.runs_io import load_run_model

    if int8 not in (None, "dynamic", "static", "both"):
        raise ValueError(f"int8 must be dynamic, static, both or None, got {int8!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, cfg, classes = load_run_model(run_dir, purpose="export")
    size = cfg.data.image_size
    data = _run_data(run_dir, cfg)
    val = CachedImageDataset(data.cache, data.part("val"), data.classes)
    if list(val.class_names) != list(classes):
        raise ValueError(f"{run_dir}: run classes {classes} differ from its data {data.classes}")
    n_images = min(len(val), max(n_parity, n_calibration))
    if n_images == 0:
        raise ValueError(f"{run_dir}: the val split is empty; parity needs val images")
    images = to_float(val.__getitems__(np.arange(n_images))[0], *input_stats(model)).numpy()
    parity_images, calib_images = images[:n_parity], images[:n_calibration]
    reference = torch_logits(model, parity_images)

    timings, files = {}, {}
    t = time.perf_counter()
    fp32 = export_onnx(model, size, out_dir / FP32_FILE)
    timings["export_s"] = round(time.perf_counter() - t, 2)
    files["fp32"] = (fp32, "onnx-fp32")
    modes = ["dynamic", "static"] if int8 == "both" else [int8] if int8 else []
    for mode in modes:
        t = time.perf_counter()
        path = out_dir / INT8_FILES[mode]
        with _quiet_logs(""):
            if mode == "dynamic":
                quantize_int8_dynamic(fp32, path)
            else:
                quantize_int8_static(fp32, path, calib_images)
        timings[f"int8_{mode}_s"] = round(time.perf_counter() - t, 2)
        files[mode] = (path, INT8_FORMATS[mode])
    (out_dir / "model.preprocessed.onnx").unlink(missing_ok=True)

    labels = val.labels[: len(parity_images)].numpy()
    entries, results = [], {}
    for key, (path, fmt) in files.items():
        logits = run_onnx(cpu_session(path), parity_images)
        p = parity(reference, logits)
        results[key] = {
            "file": path.name,
            "format": fmt,
            "size_bytes": path.stat().st_size,
            **p,
            "val_accuracy": float((logits.argmax(1) == labels).mean()),
        }
        entries.append(
            ModelFile(
                path=path.name,
                format=fmt,
                size_bytes=path.stat().st_size,
                sha256=sha256_file(path),
                parity=Parity(**p),
            )
        )
        log.info("%s: %s", path.name, results[key])
    report = {
        "run": str(run_dir.resolve()),
        "model": cfg.model.name,
        "image_size": size,
        "classes": classes,
        "input": f"{INPUT_NAME}: float32 (batch, 3, {size}, {size}), normalised, NCHW RGB",
        "output": f"{OUTPUT_NAME}: float32 (batch, {len(classes)})",
        "opset": _opset(fp32),
        "parity_reference": "PyTorch FP32 on the first val images of the run's split",
        "parity_images": len(parity_images),
        "calibration": (
            f"static INT8: MinMax ranges from the first {len(calib_images)} val images"
            if "static" in files
            else None
        ),
        "pytorch_val_accuracy": float((reference.argmax(1) == labels).mean()),
        "files": results,
        "timings": timings,
        "dermkit_version": __version__,
    }
    (out_dir / "export.json").write_text(json.dumps(report, indent=2))
    card = build_card(run_dir, cfg, classes, model, data, entries)
    write_card(card, out_dir)
    if (run_dir / "ood.json").exists():  # the unfamiliar-image flag travels with the model
        (out_dir / "ood.json").write_bytes((run_dir / "ood.json").read_bytes())
    return report


def _opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def build_card(run_dir: Path, cfg, classes, model, data, files: list[ModelFile]) -> ModelCard:
    """The model card of an exported run (metrics copied from the run's metrics.json)."""
    from dermkit.eval.calibration import DecisionRule

    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path} not found: the card copies the run's metrics")
    result = json.loads(metrics_path.read_text())
    rule = DecisionRule.load(run_dir / "decision.json")
    run_info = {}
    if (run_dir / "run.json").exists():
        run_info = json.loads((run_dir / "run.json").read_text())
    size = cfg.data.image_size
    full_frame = cfg.data.crop == "full_frame"
    level = result.get("ci_level", 0.95)
    phantoms = is_phantom_dataset(cfg.data.path)
    return ModelCard(
        schema_version=SCHEMA_VERSION,
        name=f"dermkit {cfg.model.name} ({run_info.get('stage', 'classifier')})",
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        dermkit_version=__version__,
        source_run=str(run_dir.resolve()),
        architecture=cfg.model.name,
        parameters=sum(p.numel() for p in model.parameters()),
        pretrained_weights=run_info.get("pretrained_weights"),
        classes=list(classes),
        preprocessing=Preprocessing(
            image_size=size,
            resize=f"resize the {'long' if full_frame else 'short'} side to {size} px "
            "(PIL bicubic, antialiased)",
            crop=(
                f"pad the short side to {size} px by reflection, image centred (full_frame)"
                if full_frame
                else f"centre crop {size}x{size} ({cfg.data.crop}), after the resize"
            )
            + (
                "; then Shades of Gray colour constancy (p = 6) on the crop"
                if cfg.data.colour_constancy == "shades_of_gray"
                else ""
            ),
            crop_policy=cfg.data.crop,
            colour_constancy=cfg.data.colour_constancy,
            scale=1 / 255,
            mean=list(input_stats(model)[0]),
            std=list(input_stats(model)[1]),
            channel_order="RGB",
            input_layout="NCHW",
            input_dtype="float32",
            input_name=INPUT_NAME,
            input_shape=["batch", 3, size, size],
            output_name=OUTPUT_NAME,
            output=f"float32 logits (batch, {len(classes)}) in class order; not probabilities",
        ),
        postprocessing=Postprocessing(
            formula="p = softmax(logits / temperature) * class_scales, renormalised to sum 1 "
            "(class_scales null: none); the metrics below were computed this way",
            temperature=rule.temperature,
            class_scales=rule.class_scales,
            min_recall=rule.min_recall,
        ),
        files=files,
        training_data=_training_data(data, cfg),
        evaluation=Evaluation(
            split="test",
            n_images=int(result["n"]),
            n_lesions=int(result["n_groups"]),
            ci=f"{level:.0%} percentile bootstrap over lesions, B={result.get('n_boot')}",
            metrics={
                name: MetricEstimate(
                    value=e.get("value"), ci_low=e.get("ci_low"), ci_high=e.get("ci_high")
                )
                for name, e in result["metrics"].items()
            },
        ),
        intended_use=(
            "Research and education on dermoscopic skin-lesion classification; as a decision-"
            "support prototype only under clinical supervision and after local validation on "
            "the target population, camera and workflow."
        ),
        limitations=[
            *([DEMO_NOTICE] if phantoms else []),
            f"Trained on {cfg.data.path}; performance on other devices, skin types, body sites "
            "or non-dermoscopic photographs is unknown.",
            f"Input resolution is {size} px; finer detail than that is not seen.",
            "Only the classes listed are known: any other lesion is forced into one of them.",
            "Metrics are from one test split; confidence intervals show their uncertainty.",
            "INT8 files may disagree with the FP32 model on some images (see parity).",
        ],
        not_a_diagnosis=NOT_A_DIAGNOSIS,
        demo_notice=DEMO_NOTICE if phantoms else None,
    )
