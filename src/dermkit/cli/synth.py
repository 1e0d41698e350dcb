"""``dermkit synth``: the latent-diffusion generator, its samples and their quality."""

from __future__ import annotations

from pathlib import Path

from dermkit.cli.common import (
    CONFIG_PARAMS,
    RESUMABLE,
    Param,
    add_commands,
    command_group,
    stage_command,
)

app = command_group(
    "Class-conditional latent diffusion: autoencoder, diffusion, sampling, quality."
)

add_commands(
    app,
    {
        "autoencoder": stage_command(
            "Train the KL autoencoder (diffusers AutoencoderKL) on the train split's images.",
            schema="dermkit.synth.settings:AutoencoderRunConfig",
            section="synth_autoencoder",
            run="dermkit.synth.autoencoder:train_autoencoder",
            params=RESUMABLE,
            extras=("synth",),
        ),
        "diffusion": stage_command(
            "Train the class-conditional latent diffusion UNet (DDPM, label dropout for CFG).",
            schema="dermkit.synth.settings:DiffusionRunConfig",
            section="synth_diffusion",
            run="dermkit.synth.diffusion:train_diffusion",
            params=(
                *CONFIG_PARAMS,
                Param.option(
                    "autoencoder",
                    Path,
                    "autoencoder run folder (overrides the config)",
                    "autoencoder",
                ),
                "resume",
            ),
            extras=("synth",),
        ),
        "sample": stage_command(
            "Generate a class-balanced synthetic set (resumable) and its manifest.",
            schema="dermkit.synth.settings:SampleConfig",
            section="synth_sample",
            run="dermkit.synth.sample:run_sample",
            params=(
                Param.argument("generator", Path, "synth diffusion run folder", "generator"),
                "overrides",
                Param.option(
                    "balance",
                    str,
                    "'uniform' (default) or a JSON file: per-class totals, shares or generate "
                    "counts",
                    "balance",
                ),
                Param.option("out", Path, "output folder (default runs/synth-samples)", "out_dir"),
                "preset",
                "config",
            ),
            extras=("synth",),
        ),
        "quality": stage_command(
            "FD, KID, precision/recall (per class), TSTR vs TRTR and a memorisation check.",
            schema="dermkit.synth.settings:QualityConfig",
            section="synth_quality",
            run="dermkit.synth.quality:run_quality",
            params=(
                *CONFIG_PARAMS,
                Param.option(
                    "synthetic", Path, "manifest written by synth sample", "synthetic_manifest"
                ),
                Param.option(
                    "encoder", Path, "dermkit run folder giving the feature space", "encoder"
                ),
            ),
        ),
    },
)
