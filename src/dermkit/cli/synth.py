"""``dermkit synth``: the latent-diffusion generator, its samples and their quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import (
    CONFIG_PARAMS,
    RESUMABLE,
    Param,
    add_commands,
    command_group,
    reported,
    stage_command,
)


def guidance_override(value: str) -> str:
    """``--guidance``: a scale or an inline mapping as given; a JSON file as its content
    (JSON is YAML: the override reads it), so the run's config.yaml keeps the scales."""
    path = Path(value)
    if path.suffix.lower() != ".json" and not path.is_file():
        return value
    if not path.is_file():
        raise FileNotFoundError(f"--guidance: {path} not found")
    try:
        return json.dumps(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"--guidance {path}: not valid JSON: {e}") from e


def codec(
    autoencoder: Annotated[Path, typer.Argument(help="dermkit synth autoencoder run folder")],
    judge: Annotated[
        Path, typer.Option(help="classifier trained on real images: a run or baseline folder")
    ],
    out: Annotated[
        Path | None, typer.Option(help="output folder (default AUTOENCODER/codec)")
    ] = None,
    split: Annotated[str, typer.Option(help="the images to judge: train, val or test")] = "val",
) -> None:
    """Does each class survive the autoencoder? The judge on real images, their
    reconstructions, and the two with their 8x8-tile colour and detail swapped."""
    from dermkit.synth.codec_check import run_codec_check

    with reported():
        path = run_codec_check(autoencoder, judge, out or autoencoder / "codec", split)
    print(path.read_text())
    print(path)


def merge(
    out: Annotated[Path, typer.Argument(help="the merged manifest to write (.csv)")],
    source: Annotated[
        list[str],
        typer.Option(
            help="CLASS=MANIFEST: that class's rows from that manifest; default=MANIFEST "
            "for every other class (repeatable)"
        ),
    ],
) -> None:
    """One synthetic set from several generators: each class's rows (kept and rejected) from
    the manifest named for it, the other classes from the default one."""
    from dermkit.data.manifest import read_synthetic_rows
    from dermkit.synth.merge import write_merged

    with reported():
        sources = {}
        for item in source:
            label, sep, path = item.partition("=")
            if not sep or not label.strip() or not path.strip():
                raise ValueError(f"--source {item!r}: expected CLASS=MANIFEST or default=MANIFEST")
            if label.strip() in sources:
                raise ValueError(f"--source {item!r}: class {label.strip()!r} is given twice")
            sources[label.strip()] = path.strip()
        path = write_merged(sources, out)
    print("training rows per class:")
    print(read_synthetic_rows(path)["label"].value_counts().sort_index().to_string())
    print(path)


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
            "Generate a class-balanced synthetic set (resumable) and its manifest.\n\n"
            "--filter RUN keeps an image only when RUN (a classifier trained on the real "
            "train split: a dermkit finetune/distill run, or a dermkit baseline run, refitted) "
            "predicts the requested class and the image is no near-copy of a training image; "
            "the sampler draws in rounds until each class has its count, at most "
            "filter.max_draw_factor (4) times it. The manifest keeps rejected rows "
            "(kept=False, reject_reason); training reads the kept ones. Settings: "
            "filter.min_prob, filter.memorisation, filter.memorisation_percentile.",
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
                Param.option(
                    "filter",
                    Path,
                    "keep only images this real-trained classifier or baseline run agrees with",
                    "filter.classifier",
                ),
                Param.option(
                    "guidance",
                    str,
                    "CFG scale: one number, or per class as an inline mapping "
                    "('{mel: 2, df: 4, default: 3}') or a JSON file of one; classes left out "
                    "get 'default' (else 2)",
                    "sampler.guidance",
                    convert=guidance_override,
                ),
                Param.option(
                    "from_real",
                    float,
                    "STRENGTH in (0, 1]: image-guided variations (SDEdit): start each image "
                    "from a real train image of its class noised to t ~ STRENGTH * T; small "
                    "keeps the lesion, 1 is plain sampling",
                    "from_real",
                ),
                "preset",
                "config",
            ),
            extras=("synth",),
        ),
        "codec": codec,
        "merge": merge,
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
