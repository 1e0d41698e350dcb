"""The served model: an exported ONNX classifier (plus optional early-exit segments) and
everything between an uploaded image and the answer the server and the web page show.

Loaded from an export folder (``dermkit export``): ``model_card.json`` (validated against
its schema; it fixes classes, preprocessing and the decision rule) and the ONNX file, whose
SHA-256 must match the card. Early exits come from a ``dermkit exits export`` folder
(``segments.json``, ``segment_*.onnx``, ``policy.json``). Saliency overlays rebuild the
PyTorch model from the source run's ``model.safetensors``. Nothing is ever unpickled.

One prediction, the same steps on the server and in the page (``web/core.js``):

1. decode (``dermkit.data.images.decode_rgb_bytes``: full decode, bomb and size limits),
2. resize the short side to S with PIL bicubic and centre-crop S x S
   (``crop_image`` with the card's ``crop_policy``: the training cache's own function;
   ``full_frame`` resizes the long side and pads by reflection instead), then the card's
   ``colour_constancy`` on the crop (``shades_of_gray``, or none),
3. ``(x / 255 - mean) / std`` in float32, NCHW,
4. ONNX Runtime -> logits; with exits, the segments run in order and the exit policy decides
   where the image leaves,
5. probabilities: the card's decision rule (``softmax(logits / T) * class_scales``,
   renormalised) at the final exit; at an early exit, the softmax at that exit's fitted
   temperature (the class scales were fitted for the final head only),
6. summary: calibrated confidence (top probability), normalised entropy, an uncertainty
   level, whether a malignant class is suspected, and the advice message.

Imports stay light (no torch) unless exits or saliency are used, so the server starts fast.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermkit.core.files import sha256_file
from dermkit.core.onnx import cpu_session
from dermkit.data.cache import crop_image
from dermkit.data.labels import HAM10000_DESCRIPTIONS, MALIGNANT_CLASSES
from dermkit.deploy.model_card import CARD_FILE, NOT_A_DIAGNOSIS, ModelCard
from dermkit.eval.ood import OOD_FILE, OodRule

FP32_FILE = "model.onnx"  # as written by dermkit.deploy.export (not imported: it pulls torch)
SEGMENTS_MANIFEST = "segments.json"
POLICY_FILE = "policy.json"

MESSAGES = {
    "standard": (
        "Not a diagnosis. This is a statistical estimate from one image and may be wrong. "
        "See a dermatologist about any skin lesion that worries you, is new, changes, "
        "bleeds or itches."
    ),
    "low_confidence": (
        "The model is uncertain about this image, so its answer is unreliable. "
        "Not a diagnosis: please have the lesion examined by a dermatologist."
    ),
    "malignant_suspect": (
        "The estimate includes a possibly malignant lesion type. This is not a diagnosis, "
        "and it can be wrong either way: please see a dermatologist promptly, and do not "
        "wait for the lesion to change."
    ),
}


class ModelFolderError(ValueError):
    """An export or exits folder cannot be served; the message names the file."""


def load_card(model_dir: Path) -> ModelCard:
    path = model_dir / CARD_FILE
    if not path.exists():
        raise ModelFolderError(
            f"{path} not found: serve an export folder (`dermkit export RUN --out DIR`)"
        )
    try:
        return ModelCard.model_validate_json(path.read_text())
    except ValueError as e:
        raise ModelFolderError(f"{path}: not a valid model card: {e}") from e


@dataclass
class Prediction:
    """One answer. probabilities: (C,) float64, calibrated, sum 1; logits: (C,) float32."""

    probabilities: np.ndarray
    logits: np.ndarray
    exit_index: int
    exit_blocks: int | None
    crop: np.ndarray = field(repr=False)  # (S, S, 3) uint8: what the model saw


@dataclass
class Summary:
    top_class: str
    confidence: float
    entropy: float
    uncertainty: str
    malignant_probability: float
    malignant_suspect: bool
    advice: str
    message: str


class ServedModel:
    """An export folder opened for serving.

    Args:
        model_dir: ``dermkit export`` folder (model_card.json + ONNX files).
        model_file: which listed ONNX file to serve (default ``model.onnx``, FP32); the
            browser downloads the same file, so both sides run the same graph.
        exits_dir: optional ``dermkit exits export`` folder of the same model.
        saliency_run: run folder with ``model.safetensors`` for Grad-CAM (default: the
            card's ``source_run`` when it still exists).
        threads: ONNX Runtime intra-op threads per request.
        malignant_classes: classes that make a result "malignant-suspect".
        malignant_threshold: summed malignant probability from which a result is suspect.
        confidence_levels: (a, b): calibrated confidence < a is high uncertainty, < b
            moderate, else low.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_file: str = FP32_FILE,
        exits_dir: str | Path | None = None,
        saliency_run: str | Path | None = None,
        threads: int = 1,
        malignant_classes: frozenset[str] | set[str] = MALIGNANT_CLASSES,
        malignant_threshold: float = 0.3,
        confidence_levels: tuple[float, float] = (0.5, 0.8),
        ood_file: str | Path | None = None,
    ):
        self.dir = Path(model_dir)
        self.card = load_card(self.dir)
        listed = {f.path: f for f in self.card.files}
        if model_file not in listed:
            raise ModelFolderError(
                f"{self.dir / CARD_FILE}: {model_file!r} is not one of its files {sorted(listed)}"
            )
        self.model_path = self.dir / model_file
        if not self.model_path.exists():
            raise ModelFolderError(f"{self.model_path} not found")
        if sha256_file(self.model_path) != listed[model_file].sha256:
            raise ModelFolderError(
                f"{self.model_path}: SHA-256 differs from the model card's; the file was "
                "changed after export"
            )
        self.session = cpu_session(self.model_path, threads)
        pre = self.card.preprocessing
        self.size = pre.image_size
        self.mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
        self.scale = np.float32(pre.scale)
        self.classes = list(self.card.classes)
        post = self.card.postprocessing
        self.temperature = float(post.temperature)
        self.class_scales = None if post.class_scales is None else list(post.class_scales)
        self.malignant_classes = [c for c in self.classes if c in set(malignant_classes)]
        self.malignant_threshold = float(malignant_threshold)
        self.confidence_levels = (float(confidence_levels[0]), float(confidence_levels[1]))
        self.exits = _open_exits(Path(exits_dir), self) if exits_dir else None
        self._saliency_run = Path(saliency_run) if saliency_run else Path(self.card.source_run)
        self._torch_model = None
        self._torch_lock = threading.Lock()
        self.ood = find_ood(self.dir, Path(self.card.source_run), ood_file)

    # ------------------------------------------------------------------ pipeline

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 -> (crop (S, S, 3) uint8, input (1, 3, S, S) float32)."""
        pre = self.card.preprocessing
        crop = crop_image(rgb, self.size, pre.crop_policy, pre.colour_constancy)
        return crop, self.normalise(crop)

    def normalise(self, crop: np.ndarray) -> np.ndarray:
        """A preprocessed crop (S, S, 3) uint8 -> the model input (1, 3, S, S) float32."""
        x = crop.transpose(2, 0, 1)[None].astype(np.float32) * self.scale
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x, dtype=np.float32)

    def probabilities(self, logits: np.ndarray, exit_index: int | None = None) -> np.ndarray:
        """(C,) logits -> (C,) float64 probabilities of the exit the image left at."""
        z = np.asarray(logits, np.float64)
        final = exit_index is None or self.exits is None or exit_index == self.exits.n_exits - 1
        t = self.temperature if final else self.exits.policy.temperature(exit_index)
        p = np.exp(z / t - (z / t).max())
        p = p / p.sum()
        if final and self.class_scales is not None:
            p = p * np.asarray(self.class_scales)
            p = p / p.sum()
        return p

    def predict(self, rgb: np.ndarray) -> Prediction:
        """Decoded image (H, W, 3) uint8 -> :class:`Prediction`."""
        crop, x = self.preprocess(rgb)
        if self.exits is not None:
            logits, exit_index, blocks = self.exits.runner.predict(x)
            j = int(exit_index[0])
            return Prediction(self.probabilities(logits[0], j), logits[0], j, int(blocks[0]), crop)
        name = self.card.preprocessing.input_name
        logits = self.session.run(None, {name: x})[0][0]
        return Prediction(self.probabilities(logits), logits, 0, None, crop)

    def summarise(self, probs: np.ndarray) -> Summary:
        """Confidence, uncertainty and advice of calibrated probabilities (C,)."""
        top = int(np.argmax(probs))
        confidence = float(probs[top])
        nz = probs[probs > 0]
        entropy = float(-(nz * np.log(nz)).sum() / np.log(len(probs)))
        mal = [self.classes.index(c) for c in self.malignant_classes]
        mal_p = float(probs[mal].sum()) if mal else 0.0
        low, high = self.confidence_levels
        uncertainty = "high" if confidence < low else "moderate" if confidence < high else "low"
        suspect = top in mal or mal_p >= self.malignant_threshold
        advice = (
            "malignant_suspect"
            if suspect
            else "low_confidence"
            if uncertainty == "high"
            else "standard"
        )
        return Summary(
            self.classes[top],
            confidence,
            entropy,
            uncertainty,
            mal_p,
            suspect,
            advice,
            MESSAGES[advice],
        )

    def familiarity(self, pred: Prediction) -> dict:
        """The unfamiliar-image flag of a prediction (:mod:`dermkit.eval.ood`).

        ``{"unfamiliar": energy > threshold, "ood_score": the energy of the logits,
        "ood_threshold", "unfamiliar_message"}``; all None when no ``ood.json`` was found,
        or when an early exit answered (the threshold was fitted on the final head).
        """
        final = self.exits is None or pred.exit_index == self.exits.n_exits - 1
        if self.ood is None or not final:
            return dict.fromkeys(("unfamiliar", "ood_score", "ood_threshold", "unfamiliar_message"))
        score = float(self.ood.scores(np.asarray(pred.logits)[None])[0])
        unfamiliar = score > self.ood.threshold
        return {
            "unfamiliar": bool(unfamiliar),
            "ood_score": score,
            "ood_threshold": float(self.ood.threshold),
            "unfamiliar_message": self.ood.message if unfamiliar else None,
        }

    def exit_info(self, pred: Prediction) -> dict:
        """{"index", "name", "blocks", "of"}: which exit answered (0 and "final" without exits)."""
        if self.exits is None:
            return {"index": 0, "name": "final", "blocks": None, "of": 1}
        n = self.exits.n_exits
        name = "final" if pred.exit_index == n - 1 else f"early exit {pred.exit_index + 1}"
        return {"index": pred.exit_index, "name": name, "blocks": pred.exit_blocks, "of": n}

    # ------------------------------------------------------------------ saliency

    @property
    def saliency_available(self) -> bool:
        return (self._saliency_run / "model.safetensors").exists()

    def saliency_png(self, pred: Prediction, out_size: int = 224) -> bytes:
        """Grad-CAM of the top class over the model's input crop, as a PNG (out_size px).

        Computed on the PyTorch model rebuilt from safetensors (the full network, also when
        an early exit answered). Hooks make Grad-CAM stateful, so calls are serialised.
        """
        import torch
        from matplotlib import colormaps
        from PIL import Image

        from dermkit.explain.saliency import grad_cam
        from dermkit.models.runs_io import load_run_model

        with self._torch_lock:
            if self._torch_model is None:
                model, _, classes = load_run_model(self._saliency_run)
                if list(classes) != self.classes:
                    raise ModelFolderError(
                        f"{self._saliency_run}: classes {classes} differ from the card's"
                    )
                self._torch_model = model
            x = self.normalise(pred.crop)  # already the model's crop (colour constancy included)
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            target = [ClassifierOutputTarget(int(np.argmax(pred.probabilities)))]
            cam = grad_cam(self._torch_model, torch.from_numpy(x), target)[0]
        heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(
            (out_size, out_size), Image.Resampling.BILINEAR
        )
        colour = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
        base = np.asarray(
            Image.fromarray(pred.crop).resize((out_size, out_size), Image.Resampling.BICUBIC),
            np.float64,
        )
        blend = np.uint8(np.clip(0.55 * base + 0.45 * 255 * colour, 0, 255))
        buf = io.BytesIO()
        Image.fromarray(blend).save(buf, format="PNG")
        return buf.getvalue()

    # ------------------------------------------------------------------ the page

    def web_config(self) -> dict:
        """What the page needs to reproduce :meth:`predict` and :meth:`summarise` in JS."""
        pre = self.card.preprocessing
        cfg = {
            "name": self.card.name,
            "classes": self.classes,
            "descriptions": {c: HAM10000_DESCRIPTIONS.get(c, c) for c in self.classes},
            "malignant_classes": self.malignant_classes,
            "malignant_threshold": self.malignant_threshold,
            "confidence_levels": list(self.confidence_levels),
            "image_size": self.size,
            "crop_policy": pre.crop_policy,
            "colour_constancy": pre.colour_constancy,
            "scale": float(pre.scale),
            "mean": list(pre.mean),
            "std": list(pre.std),
            "input_name": pre.input_name,
            "temperature": self.temperature,
            "class_scales": self.class_scales,
            "model_url": f"/model/{self.model_path.name}",
            "exits": None,
            "messages": MESSAGES,
            "not_a_diagnosis": NOT_A_DIAGNOSIS,
            # Set for models trained on phantoms: the page shows it above every answer.
            "demo_notice": self.card.demo_notice,
            # The unfamiliar-image flag: energy of the final logits > threshold (ood.json).
            "ood": None
            if self.ood is None
            else {
                "score": self.ood.score,
                "temperature": self.ood.temperature,
                "threshold": self.ood.threshold,
                "message": self.ood.message,
            },
        }
        if self.exits is not None:
            cfg["exits"] = {
                "segments": [f"/model/{name}" for name in self.exits.files],
                "exit_depths": self.exits.depths,
                "policy": self.exits.policy.to_dict(),
            }
        return cfg

    def model_files(self) -> dict[str, Path]:
        """Downloadable model files by public name (the page fetches them; nothing else)."""
        files = {self.model_path.name: self.model_path}
        if self.exits is not None:
            files |= {name: self.exits.dir / name for name in self.exits.files}
        return files


def find_ood(
    model_dir: Path, source_run: Path | None, explicit: str | Path | None = None
) -> OodRule | None:
    """The unfamiliar-image flag to serve: ``explicit``, else ``ood.json`` in the export
    folder, else in the card's source run (``dermkit evaluate RUN --fit-ood`` writes it
    there); None when there is none. Only the energy score is served: it needs the logits
    alone, which the ONNX model (and the page, in the browser) has."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise ModelFolderError(f"{path} not found: fit it with dermkit evaluate RUN --fit-ood")
        candidates = [path]
    else:
        candidates = [model_dir / OOD_FILE] + ([source_run / OOD_FILE] if source_run else [])
    for path in candidates:
        if path.is_file():
            try:
                rule = OodRule.load(path)
            except (ValueError, TypeError) as e:
                raise ModelFolderError(f"{path}: not a valid ood.json: {e}") from e
            if rule.score != "energy":
                raise ModelFolderError(f"{path}: score {rule.score!r}; serving flags by energy")
            return rule
    return None


@dataclass
class _Exits:
    dir: Path
    files: list[str]
    depths: list[int]
    policy: object  # dermkit.exits.policy.ExitPolicy
    runner: object  # dermkit.exits.onnx_segments.OnnxEarlyExitRunner

    @property
    def n_exits(self) -> int:
        return len(self.files)


def _open_exits(folder: Path, model: ServedModel) -> _Exits:
    """Check an exits export folder against the served model and open its runner."""
    from dermkit.exits.onnx_segments import OnnxEarlyExitRunner
    from dermkit.exits.policy import ExitPolicy

    manifest_path, policy_path = folder / SEGMENTS_MANIFEST, folder / POLICY_FILE
    for path in (manifest_path, policy_path):
        if not path.exists():
            raise ModelFolderError(
                f"{path} not found: pass a `dermkit exits export ... --out DIR` folder"
            )
    manifest = json.loads(manifest_path.read_text())
    if manifest["num_classes"] != len(model.classes) or manifest["img_size"] != model.size:
        raise ModelFolderError(
            f"{manifest_path}: {manifest['num_classes']} classes at {manifest['img_size']} px, "
            f"but the model card has {len(model.classes)} classes at {model.size} px"
        )
    policy = ExitPolicy.load(policy_path)
    return _Exits(
        folder,
        list(manifest["segments"]),
        list(manifest["exit_depths"]),
        policy,
        OnnxEarlyExitRunner(folder, policy),
    )
