"""Early exits in ONNX: one model per segment and a small onnxruntime runner.

A single ONNX graph cannot drop rows between blocks, so the early-exit model is exported
as segments: ``segment_0.onnx`` takes images (B, 3, S, S) and returns the tokens after
the first exit's blocks plus that exit's logits; ``segment_j.onnx`` takes tokens and
returns (tokens, logits_j); the last returns the final logits only. The batch axis is
dynamic. :class:`OnnxEarlyExitRunner` chains the segments with the same
:class:`~dermkit.exits.policy.ExitPolicy` code as the PyTorch path, removing the rows that
left before running the next segment.

Exported with a policy (``fused``), the exit decision is part of the graph: each early
segment also returns ``exit`` (B,) bool from :class:`~dermkit.exits.gate.ExitGate`, so one
ONNX call answers "leave or continue"; exits the policy never uses are pruned first
(their blocks join the next segment), and the folder gets the pruned ``policy.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermkit.core.onnx import cpu_session
from dermkit.exits.gate import ExitGate, kept_exits, prune_exits
from dermkit.exits.model import EarlyExitModel
from dermkit.exits.policy import ExitPolicy

MANIFEST = "segments.json"
POLICY = "policy.json"


class _Segment(nn.Module):
    """Segment j of an EarlyExitModel as a module: inputs -> (tokens, logits) or logits."""

    def __init__(self, model: EarlyExitModel, j: int, policy: ExitPolicy | None = None):
        super().__init__()
        self.model, self.j = model, j
        self.last = j == model.n_exits - 1
        self.gate = ExitGate(policy, j) if policy is not None and not self.last else None

    def forward(self, inputs: torch.Tensor):
        tokens, logits = self.model.segment(inputs, self.j)
        if self.last:
            return logits
        if self.gate is not None:
            return tokens, logits, self.gate(logits)
        return tokens, logits


@torch.no_grad()
def export_segments(
    model: EarlyExitModel,
    out_dir: str | Path,
    img_size: int,
    opset: int = 17,
    policy: ExitPolicy | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Write ``segment_{j}.onnx`` per exit and ``segments.json``; returns the folder.

    With ``policy``: fused segments (logits + exit flag) of the pruned model, and the
    pruned policy as ``policy.json`` (``class_names`` name its protected classes).

    Uses the TorchScript-based exporter (``dynamo=False``, deprecated by torch but still
    shipped): it traces the SSM head's fixed-length sequential scan into plain ONNX ops in
    about 2 s, where the dynamo exporter took about 300 s for the same segment on a 2-core
    CPU (torch 2.14). Switch when the TorchScript exporter is removed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = None
    if policy is not None:
        kept = kept_exits(policy)
        model, policy = prune_exits(model, policy)
    model = model.eval()
    device = next(model.parameters()).device
    h = torch.zeros(2, 3, img_size, img_size, device=device)
    files = []
    for j in range(model.n_exits):
        # eval(): torch.onnx.export restores the exported module's own mode afterwards, and
        # a fresh module is in training mode; that would switch the shared backbone to
        # training, and the next segment's input would then update BatchNorm statistics.
        seg = _Segment(model, j, policy).eval()
        last = seg.last
        outputs = ["logits"] if last else ["tokens_out", "logits"]
        if seg.gate is not None:
            outputs.append("exit")
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
        "fused": policy is not None,
    }
    if policy is not None:
        manifest["kept_exits"] = kept
        manifest["policy"] = policy.to_dict()
        policy.save(out_dir / POLICY, class_names)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out_dir


class OnnxEarlyExitRunner:
    """Run exported segments with onnxruntime and an exit policy.

    Args:
        folder: a folder written by :func:`export_segments`.
        policy: the exit policy (same thresholds/temperatures as the PyTorch model).
        providers: onnxruntime execution providers (default CPU).
        threads: intra-op threads per session (None: onnxruntime's default).

    Fused segments decide in the graph; their policy must be the one baked in.
    """

    def __init__(
        self,
        folder: str | Path,
        policy: ExitPolicy,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
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
        self.fused = bool(self.manifest.get("fused", False))
        if self.fused and ExitPolicy.from_dict(self.manifest["policy"]) != policy:
            raise ValueError(
                f"{manifest_path}: the segments decide with the policy exported with them "
                f"({self.manifest['policy']}); got a different one: {policy.to_dict()}"
            )
        self.policy = policy
        # one session per segment, idle threads sleeping (see core.onnx.cpu_session)
        self.sessions = [
            cpu_session(folder / name, threads, providers) for name in self.manifest["segments"]
        ]
        self.input_names = [s.get_inputs()[0].name for s in self.sessions]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images (B, 3, S, S) float32 (normalised) -> (logits (B, C), exit (B,), blocks (B,))."""
        B = len(images)
        depths = np.asarray(self.manifest["exit_depths"])
        logits_out = np.zeros((B, self.manifest["num_classes"]), dtype=np.float32)
        exit_index = np.full(B, len(self.sessions) - 1, dtype=np.int64)
        active = np.arange(B)
        h = np.ascontiguousarray(images, dtype=np.float32)
        last = len(self.sessions) - 1
        for j, session in enumerate(self.sessions):
            out = session.run(None, {self.input_names[j]: h})
            logits = out[0] if j == last else out[1]
            if j == last:
                leave = np.ones(len(logits), dtype=bool)
            elif self.fused:
                leave = out[2]
            else:
                leave = self.policy.exits_now(logits, j)
            logits_out[active[leave]] = logits[leave]
            exit_index[active[leave]] = j
            if leave.all() or j == len(self.sessions) - 1:
                break
            h = np.ascontiguousarray(out[0][~leave])
            active = active[~leave]
        return logits_out, exit_index, depths[exit_index]


def export_exit_run(
    exit_run: str | Path, head: str, out_dir: str | Path, fused: bool = True
) -> Path:
    """Export the calibrated ``head`` of an exit run folder as ONNX segments; returns the folder.

    ``fused``: the exit decision inside each segment and unused exits pruned (the policy
    travels in ``policy.json`` either way).
    """
    # Lazy: the server imports this module for the ONNX runner alone; reading a run
    # folder pulls in the training stack (data preparation, timm models).
    from dermkit.exits.run_io import ExitRun

    run = ExitRun.open(exit_run)
    policy = run.policy(head)
    if fused:
        return export_segments(
            run.model(head), out_dir, run.info["img_size"], policy=policy, class_names=run.classes
        )
    export_segments(run.model(head), out_dir, run.info["img_size"])
    policy.save(Path(out_dir) / "policy.json", run.classes)
    return Path(out_dir)
