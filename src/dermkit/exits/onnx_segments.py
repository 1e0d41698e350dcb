"""Early exits in ONNX: one model per segment and a small onnxruntime runner.

A single ONNX graph cannot drop rows between blocks, so the early-exit model is exported
as segments: ``segment_0.onnx`` takes images (B, 3, S, S) and returns the tokens after
the first exit's blocks plus that exit's logits; ``segment_j.onnx`` takes tokens and
returns (tokens, logits_j); the last returns the final logits only. The batch axis is
dynamic. :class:`OnnxEarlyExitRunner` chains the segments with the same
:class:`~dermkit.exits.policy.ExitPolicy` code as the PyTorch path, removing the rows that
left before running the next segment.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermkit.exits.model import EarlyExitViT
from dermkit.exits.policy import ExitPolicy

MANIFEST = "segments.json"


class _Segment(nn.Module):
    """Segment j of an EarlyExitViT as a module: inputs -> (tokens, logits) or logits."""

    def __init__(self, model: EarlyExitViT, j: int):
        super().__init__()
        self.model, self.j = model, j
        self.last = j == model.n_exits - 1

    def forward(self, inputs: torch.Tensor):
        tokens, logits = self.model.segment(inputs, self.j)
        return logits if self.last else (tokens, logits)


@torch.no_grad()
def export_segments(
    model: EarlyExitViT, out_dir: str | Path, img_size: int, opset: int = 17
) -> Path:
    """Write ``segment_{j}.onnx`` per exit and ``segments.json``; returns the folder.

    Uses the TorchScript-based exporter (``dynamo=False``, deprecated by torch but still
    shipped): it traces the SSM head's fixed-length sequential scan into plain ONNX ops in
    about 2 s, where the dynamo exporter took about 300 s for the same segment on a 2-core
    CPU (torch 2.14). Switch when the TorchScript exporter is removed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    device = next(model.parameters()).device
    h = torch.zeros(2, 3, img_size, img_size, device=device)
    files = []
    for j in range(model.n_exits):
        seg = _Segment(model, j)
        last = seg.last
        outputs = ["logits"] if last else ["tokens_out", "logits"]
        name = f"segment_{j}.onnx"
        in_name = "images" if j == 0 else "tokens"
        with warnings.catch_warnings():  # tracer warnings on python-int shape arithmetic
            warnings.simplefilter("ignore")
            torch.onnx.export(
                seg,
                (h,),
                str(out_dir / name),
                input_names=[in_name],
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in [in_name, *outputs]},
                opset_version=opset,
                dynamo=False,
            )
        files.append(name)
        if not last:
            h, _ = model.segment(h, j)
    manifest = {
        "segments": files,
        "exit_depths": list(model.exit_depths),
        "num_classes": model.num_classes,
        "head_type": model.head_type,
        "img_size": img_size,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out_dir


class OnnxEarlyExitRunner:
    """Run exported segments with onnxruntime and an exit policy.

    Args:
        folder: a folder written by :func:`export_segments`.
        policy: the exit policy (same thresholds/temperatures as the PyTorch model).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(self, folder: str | Path, policy: ExitPolicy, providers: list[str] | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: export the segments first")
        self.manifest = json.loads(manifest_path.read_text())
        if len(self.manifest["segments"]) != policy.n_exits:
            raise ValueError(
                f"{manifest_path}: {len(self.manifest['segments'])} segments, but the policy "
                f"has {policy.n_exits} exits"
            )
        self.policy = policy
        self.sessions = [
            ort.InferenceSession(
                str(folder / name), providers=providers or ["CPUExecutionProvider"]
            )
            for name in self.manifest["segments"]
        ]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images (B, 3, S, S) float32 (normalised) -> (logits (B, C), exit (B,), blocks (B,))."""
        B = len(images)
        depths = np.asarray(self.manifest["exit_depths"])
        logits_out = np.zeros((B, self.manifest["num_classes"]), dtype=np.float32)
        exit_index = np.full(B, len(self.sessions) - 1, dtype=np.int64)
        active = np.arange(B)
        h = np.ascontiguousarray(images, dtype=np.float32)
        for j, session in enumerate(self.sessions):
            out = session.run(None, {session.get_inputs()[0].name: h})
            logits = out[-1]
            leave = self.policy.exits_now(logits, j)
            logits_out[active[leave]] = logits[leave]
            exit_index[active[leave]] = j
            if leave.all() or j == len(self.sessions) - 1:
                break
            h = np.ascontiguousarray(out[0][~leave])
            active = active[~leave]
        return logits_out, exit_index, depths[exit_index]
