"""Devices: where a command runs (CUDA when present, else the CPU) and in which precision.

Training (``train/engine.py``) and batched inference (``eval/inference.py``) both build
their ``accelerate.Accelerator`` here, so a run is scored in the precision it trained in.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator


@contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """Limit torch and every OpenMP/BLAS pool (threadpoolctl) to ``threads`` (None: as is).

    On a CPU shared with other jobs, threads that wait for each other at every op's
    barrier cost far more than they give (a 2-core machine under load trains ~10x faster
    on one thread than on two).
    """
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(old)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA with bf16 or on CPUs with AVX512-BF16/AMX, else 'no'."""
    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def make_accelerator(precision: str = "auto", find_unused: bool = False) -> Accelerator:
    """An Accelerator on CUDA when present, else CPU, with the resolved mixed precision.

    ``find_unused``: DDP tolerates parameters without a gradient in a step (a part of the
    model that joins the loss only after some step, e.g. a GAN discriminator).
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    mixed_precision = resolve_precision(precision, device)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        # accelerate keeps one process-wide state and refuses a second Accelerator with
        # another precision. A single process that trains several models in turn (a study's
        # folds, a notebook, the test suite) may ask for different ones: start the state
        # afresh. The process group (PartialState) is left alone, so DDP runs are unaffected.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    if accelerator.num_processes > 1:
        # A process that exits with its gloo group alive can abort in interpreter teardown
        # ("terminate called without an active exception", SIGABRT after a finished run):
        # gloo's worker threads still hold tensors then. Destroying the group while the
        # interpreter is whole avoids it; atexit covers every command that trains.
        atexit.register(_destroy_process_group)
    return accelerator


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
