"""Self-supervised pretraining commands: ``dermkit pretrain mae|vae`` and ``dermkit probe``."""

from __future__ import annotations

from typing import Annotated

import typer

from dermkit.cli.common import (
    RESUMABLE,
    ConfigFile,
    Overrides,
    Preset,
    add_commands,
    command_group,
    console,
    fail,
    load_stage_config,
    print_json,
    reported,
    stage_command,
)

app = command_group("Self-supervised domain pretraining (MAE on a ViT, or a convolutional VAE).")

add_commands(
    app,
    {
        "mae": stage_command(
            "Masked-autoencoder pretraining; the run folder then serves as model.weights.",
            schema="dermkit.ssl.settings:MaePretrainRunConfig",
            section="pretrain_mae",
            run="dermkit.ssl.pretrain:run_pretrain_mae",
            params=RESUMABLE,
        ),
        "vae": stage_command(
            "Convolutional VAE pretraining; its encoder (vae_encoder_*) serves as model.weights.",
            schema="dermkit.ssl.settings:VaePretrainRunConfig",
            section="pretrain_vae",
            run="dermkit.ssl.pretrain:run_pretrain_vae",
            params=RESUMABLE,
        ),
    },
)


def probe(
    weights: Annotated[str, typer.Option(help="encoder weights: a run folder or a file")],
    model: Annotated[
        str | None, typer.Option(help="backbone name (default: the run's encoder.json)")
    ] = None,
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    k: Annotated[int, typer.Option(help="neighbours of the k-NN probe")] = 20,
) -> None:
    """Linear-probe and k-NN macro-F1 (val and test) of any encoder's frozen features.

    The data comes from the finetune config (preset, --config, data.* overrides).
    """
    from dermkit.eval.probe import probe_weights
    from dermkit.models.weights import pretrain_backbone

    with reported():
        cfg = load_stage_config(
            "dermkit.train.settings:FinetuneRunConfig", "finetune", preset, config, overrides or []
        )
        model = model or pretrain_backbone(weights)
        if model is None:
            fail(f"--model is needed: {weights} has no encoder.json naming its backbone")
        result, report = probe_weights(cfg.data, cfg.seed, weights, model, k=k)
    if not report.ok:
        console.print(f"[yellow]warning:[/] incomplete weights\n{report}", highlight=False)
    print_json({"model": model, "weights": str(weights), "weights_ok": report.ok, **result})
