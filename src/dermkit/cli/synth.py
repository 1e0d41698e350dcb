"""``dermkit synth``: the latent-diffusion generator, its samples and their quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import RESUMABLE, Param, stage_command

app = typer.Typer(
    help="Class-conditional latent diffusion: autoencoder, diffusion, sampling, quality.",
    no_args_is_help=True,
)

app.command("autoencoder")(
    stage_command(
        "Train the KL autoencoder (diffusers AutoencoderKL) on the train split's images.",
        schema="dermkit.synth.settings:AutoencoderRunConfig",
        section="synth_autoencoder",
        run="dermkit.synth.autoencoder:train_autoencoder",
        params=RESUMABLE,
        extras=("synth",),
    )
)
app.command("diffusion")(
    stage_command(
        "Train the class-conditional latent diffusion UNet (DDPM, label dropout for CFG).",
        schema="dermkit.synth.settings:DiffusionRunConfig",
        section="synth_diffusion",
        run="dermkit.synth.diffusion:train_diffusion",
        params=(
            "overrides",
            "preset",
            "config",
            Param(
                "autoencoder",
                Annotated[
                    Path | None,
                    typer.Option(help="autoencoder run folder (overrides the config)"),
                ],
                key="autoencoder",
            ),
            "resume",
        ),
        extras=("synth",),
    )
)
app.command("sample")(
    stage_command(
        "Generate a class-balanced synthetic set (resumable) and its manifest.",
        schema="dermkit.synth.settings:SampleConfig",
        section="synth_sample",
        run="dermkit.synth.sample:run_sample",
        params=(
            Param(
                "generator",
                Annotated[Path, typer.Argument(help="synth diffusion run folder")],
                key="generator",
                default=Param.REQUIRED,
            ),
            "overrides",
            Param(
                "balance",
                Annotated[
                    str | None,
                    typer.Option(
                        help="'uniform' (default) or a JSON file: per-class totals, shares or "
                        "generate counts"
                    ),
                ],
                key="balance",
            ),
            Param(
                "out",
                Annotated[
                    Path | None, typer.Option(help="output folder (default runs/synth-samples)")
                ],
                key="out_dir",
            ),
            "preset",
            "config",
        ),
        extras=("synth",),
    )
)
app.command("quality")(
    stage_command(
        "FD, KID, precision/recall (per class), TSTR vs TRTR and a memorisation check.",
        schema="dermkit.synth.settings:QualityConfig",
        section="synth_quality",
        run="dermkit.synth.quality:run_quality",
        params=(
            "overrides",
            "preset",
            "config",
            Param(
                "synthetic",
                Annotated[Path | None, typer.Option(help="manifest written by synth sample")],
                key="synthetic_manifest",
            ),
            Param(
                "encoder",
                Annotated[
                    Path | None, typer.Option(help="dermkit run folder giving the feature space")
                ],
                key="encoder",
            ),
        ),
    )
)
