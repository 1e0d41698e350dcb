"""Usage: python docs/benchmarks/exits_batch1_overhead.py ROUNDS OUT.json

Batch-1 overhead breakdown + forced-exit chains on the deployable ViT shapes (random weights)."""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dermkit.exits.latency import measure_overhead, medians_ms, ort_session, time_interleaved
from dermkit.exits.model import EarlyExitViT
from dermkit.exits.onnx_segments import OnnxEarlyExitRunner, export_segments
from dermkit.exits.policy import NEVER, ExitPolicy
from dermkit.models.backbones import create_backbone

rounds = int(sys.argv[1])
out = {}
for name, blocks, head in [
    ("vit_tiny_patch8_64", [2, 4], "linear"),
    ("vit_tiny_patch8_64", [2, 4], "ssm"),
    ("vit_student_patch8_64", [2, 3], "linear"),
    ("vit_student_patch8_64", [2, 3], "ssm"),
]:
    torch.manual_seed(0)
    m = EarlyExitViT(create_backbone(name, num_classes=7, img_size=64), blocks, head, 7).eval()
    ov = measure_overhead(m, 64, rounds=rounds, threads=2)
    tmp = Path(tempfile.mkdtemp())
    export_segments(m.keep_exits([]), tmp / "plain", 64)
    plain = ort_session(tmp / "plain" / "segment_0.onnx", 2)
    runners = {"plain": None}
    policies = {
        f"leave@{blocks[0]}": ExitPolicy([0.0, NEVER]),  # everyone leaves at the first exit
        f"leave@{blocks[1]}": ExitPolicy([NEVER, 0.0]),
        # exit kept (threshold <= 1) but every class protected: pays the head, never leaves
        f"kept@{blocks[1]},none leave": ExitPolicy([NEVER, 1.0], protected_classes=list(range(7))),
    }
    for tag, pol in policies.items():
        export_segments(m, tmp / tag, 64, policy=pol)
        runners[tag] = OnnxEarlyExitRunner(
            tmp / tag, ExitPolicy.load(tmp / tag / "policy.json"), threads=2
        )
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    feed = {plain.get_inputs()[0].name: x}
    fns = {"plain": lambda s=plain, f=feed: s.run(None, f)}
    fns.update({t: (lambda r=r, x=x: r.predict(x)) for t, r in runners.items() if r is not None})
    ms = medians_ms(time_interleaved(fns, rounds))
    key = f"{name} {head} exits{blocks}"
    out[key] = {
        "overhead_onnx": ov["onnx"],
        "overhead_eager": ov["eager"],
        "chain_ms": ms,
        "chain_ratio": {k: v / ms["plain"] for k, v in ms.items()},
    }
    print(
        key,
        json.dumps({k: {a: round(b, 3) for a, b in v.items()} for k, v in out[key].items()}),
        flush=True,
    )
Path(sys.argv[2]).write_text(json.dumps(out, indent=2))
