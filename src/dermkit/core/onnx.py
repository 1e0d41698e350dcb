"""One way to open an ONNX Runtime CPU session, for export checks, serving and benchmarks."""

from __future__ import annotations

from pathlib import Path


def cpu_session(path: str | Path, threads: int | None = 1, providers: list[str] | None = None):
    """An ONNX Runtime session on ``threads`` intra-op threads (None: ORT's default).

    Idle intra-op threads sleep instead of spinning. ORT's default lets a session's worker
    threads busy-wait after each run so the next run starts a few microseconds sooner; with
    more than one session in a process (an exit model's segments, or a plain and an exit
    model timed side by side) the spinning threads of the session that just finished steal
    the cores from the one that runs next. On the 2-core benchmark machine that made every
    batch-1 call about 3x slower (Lite0 at 128 px: 16.3 ms plain and 17.3 ms for the six
    exit segments with spinning, 4.3 ms and 5.0 ms without; BENCHMARKS.md, issue 22).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
