"""``dermkit bench sampling``: dermkit's sampler against a plain diffusers-style loop.

Measures, in one run and on the same UNet, scheduler, noise and labels, the images/s of
classifier-free-guided DDIM sampling (25 steps by default) done three ways:

* ``dermkit``: ``sample_latents`` as ``synth sample`` runs it: one UNet call per step on
  [x; x] with labels [c; null] (``guided_eps``) under the sampling precision (``auto``:
  bf16 autocast where the CPU/GPU has it, as in training);
* ``batched_fp32``: the same batched call in fp32 (what batching alone buys);
* ``plain``: the loop of a plain diffusers pipeline with an fp32 UNet: per step one UNet
  call with the class labels and one with the null labels, then the same combination.

The methods are interleaved (dermkit, batched_fp32, plain, dermkit, ...) so machine
noise hits all alike; the best round of each is kept and the ratios over ``plain`` are
reported (> 1: faster). Only the reverse process is timed (decoding is identical). The
outputs are compared too: batched_fp32 must equal plain up to float rounding, and the
relative RMS difference of the reduced-precision latents is reported.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from dermkit.runs import machine_info
from dermkit.synth.diffusion import make_sampler, sample_latents, unet_for_sampling


@torch.no_grad()
def two_call_latents(unet, scheduler, noise, labels, guidance: float, null_label: int):
    """The plain-pipeline reference: two UNet calls per step (conditional, unconditional)."""
    null = torch.full_like(labels, null_label)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps_c = unet(inp, t, class_labels=labels).sample
        eps_u = unet(inp, t, class_labels=null).sample
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


def bench_sampling(
    unet,
    scheduler_config: dict,
    latent_shape: tuple[int, int, int],
    n_classes: int,
    batch_size: int = 32,
    steps: int = 25,
    guidance: float = 2.0,
    rounds: int = 3,
    sampler: str = "ddim",
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> dict:
    """Images/s of dermkit's sampler, batched fp32 and a plain two-call fp32 loop; a dict.

    ``unet`` takes class labels in [0, n_classes] (n_classes = the null class);
    ``precision`` is dermkit's sampling precision (auto, bf16, fp16, fp32).
    """
    from dermkit.train.engine import resolve_precision

    if guidance in (0, 1):
        raise ValueError("use a guidance other than 0 and 1: those need only one UNet call")
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    unet = unet.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch_size, *latent_shape), generator=g).to(device)
    labels = torch.randint(0, n_classes, (batch_size,), generator=g).to(device)

    def timed(fn):
        sched = make_sampler(sampler, scheduler_config, steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(unet, sched, noise, labels, guidance, n_classes)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    methods = {
        "dermkit": functools.partial(sample_latents, precision=resolved),
        "batched_fp32": sample_latents,
        "plain": two_call_latents,
    }
    if resolved == "no":  # dermkit's sampler is then batched_fp32 itself
        del methods["batched_fp32"]
    for fn in methods.values():  # warm-up: allocator, kernels, thread pools
        timed(fn)
    best = dict.fromkeys(methods, float("inf"))
    outputs = {}
    for _ in range(rounds):
        for name, fn in methods.items():
            seconds, outputs[name] = timed(fn)
            best[name] = min(best[name], seconds)
    ips = {name: batch_size / s for name, s in best.items()}
    ref = outputs["plain"]
    batched = outputs.get("batched_fp32", outputs["dermkit"])
    rel_rms = (outputs["dermkit"] - ref).pow(2).mean().sqrt() / ref.std()
    return {
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "batch_size": batch_size,
        "latent_shape": list(latent_shape),
        "rounds": rounds,
        "precision": resolved,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "images_per_s": {k: round(v, 3) for k, v in ips.items()},
        "seconds_per_batch": {k: round(v, 4) for k, v in best.items()},
        "ratio_dermkit_over_plain": round(ips["dermkit"] / ips["plain"], 3),
        "ratio_batched_fp32_over_plain": round(
            ips.get("batched_fp32", ips["dermkit"]) / ips["plain"], 3
        ),
        "max_abs_latent_difference_fp32": (batched - ref).abs().max().item(),
        "relative_rms_latent_difference_dermkit": rel_rms.item(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def run_sampling_bench(
    generator: str | Path | None,
    preset: str | None,
    n_classes: int,
    batch_size: int,
    steps: int,
    guidance: float,
    rounds: int,
    precision: str = "auto",
) -> dict:
    """``dermkit bench sampling``: ``bench_sampling`` on the GPU if there is one, else CPU.

    ``generator``: a synth diffusion run folder; None: an untrained UNet of the ``preset``
    with ``n_classes`` classes (the timing does not depend on the weights).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet, sched, shape, n_classes = unet_for_sampling(generator, preset, n_classes)
    result = bench_sampling(
        unet,
        sched,
        shape,
        n_classes,
        batch_size,
        steps,
        guidance,
        rounds,
        device=device,
        precision=precision,
    )
    return result | {"machine": machine_info()}
