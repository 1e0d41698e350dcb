"""``dermkit bench sampling``: does batching the guidance halves make sampling faster?

Measures, in one run and on the same UNet, scheduler, noise and labels, the images/s of
classifier-free-guided DDIM sampling (25 steps by default) done two ways:

* ``batched``: dermkit's ``sample_latents``: one UNet call per step on [x; x] with labels
  [c; null] (``guided_eps``);
* ``two_calls``: the loop of a plain diffusers-style pipeline: per step one UNet call
  with the class labels and one with the null labels, then the same combination.

The two are interleaved (batched, two_calls, batched, ...) so machine noise hits both
alike; the best round of each is kept and the ratio batched / two_calls is reported (> 1:
batching is faster). Only the reverse process is timed (decoding is identical in both).
The two outputs are compared too: they must agree up to float rounding.
"""

from __future__ import annotations

import time

import torch

from dermkit.synth.diffusion import make_sampler, sample_latents


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
) -> dict:
    """Images/s of batched-CFG vs two-call sampling; returns a JSON-able result dict.

    ``unet`` takes class labels in [0, n_classes] (n_classes = the null class).
    """
    if guidance in (0, 1):
        raise ValueError("use a guidance other than 0 and 1: those need only one UNet call")
    unet = unet.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch_size, *latent_shape), generator=g).to(device)
    labels = torch.randint(0, n_classes, (batch_size,), generator=g).to(device)

    def timed(fn):
        sched = make_sampler(sampler, scheduler_config, steps)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(unet, sched, noise, labels, guidance, n_classes)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    methods = {"batched": sample_latents, "two_calls": two_call_latents}
    for fn in methods.values():  # warm-up: allocator, kernels, thread pools
        timed(fn)
    best = dict.fromkeys(methods, float("inf"))
    outputs = {}
    for _ in range(rounds):
        for name, fn in methods.items():
            seconds, outputs[name] = timed(fn)
            best[name] = min(best[name], seconds)
    ips = {name: batch_size / s for name, s in best.items()}
    diff = (outputs["batched"] - outputs["two_calls"]).abs().max().item()
    return {
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "batch_size": batch_size,
        "latent_shape": list(latent_shape),
        "rounds": rounds,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "images_per_s": {k: round(v, 3) for k, v in ips.items()},
        "seconds_per_batch": {k: round(v, 4) for k, v in best.items()},
        "ratio_batched_over_two_calls": round(ips["batched"] / ips["two_calls"], 3),
        "max_abs_latent_difference": diff,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
