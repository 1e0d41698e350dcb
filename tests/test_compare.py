"""`dermkit compare`: identical fine-tuning from several initialisations, side by side."""

import json

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dermkit.cli import app

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_compare_random_vs_local_weights_file_then_reuses_finished_runs(
    phantom_root, cache_dir, tmp_path
):
    common = [f"data.path={phantom_root}", f"data.cache_dir={cache_dir}", "eval.n_boot=20"]
    # a "pretrained" file: a short supervised run from another seed (another random init)
    _invoke("finetune", "--preset", "tiny", *common, "seed=1", f"out_dir={tmp_path / 'pre'}")
    weights = tmp_path / "pre" / "model.safetensors"
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "tiny", *common, f"out_dir={out}", "optim.epochs=1"]
    _invoke(*args, "--init", "random=random", "--init", f"pretrained={weights}")

    rows = json.loads((out / "compare.json").read_text())
    assert [r["init"] for r in rows] == ["random", "pretrained"]
    assert rows[1]["weights"] == str(weights)
    # convergence and gap trend of each arm (one epoch: reached at once, no slope)
    assert rows[0]["epochs to 90% of best val"] == 1 and rows[0]["gap slope / epoch"] is None
    assert (out / "compare_curves.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "pretrained/report.html" in html
    # both arms trained under the same recipe; only the initial weights differ
    cfgs = {
        n: yaml.safe_load((out / n / "config.yaml").read_text()) for n in ("random", "pretrained")
    }
    assert cfgs["random"]["model"].pop("weights") is None
    assert cfgs["pretrained"]["model"].pop("weights") == str(weights)
    for c in cfgs.values():
        del c["out_dir"]
    assert cfgs["random"] == cfgs["pretrained"]
    init_report = json.loads((out / "pretrained" / "metrics.json").read_text())
    assert init_report["history"] and init_report["training"]["epochs_run"] == 1
    # the pretrained arm really started from the file: after one epoch its weights are
    # closer to the file's than the random arm's are
    pre = load_file(weights)
    a, b = (
        load_file(out / "pretrained" / "model.safetensors"),
        load_file(out / "random" / "model.safetensors"),
    )
    key = "blocks.0.attn.qkv.weight"
    assert (a[key] - pre[key]).norm() < (b[key] - pre[key]).norm()

    # a linear probe of each arm's *initial* encoder: the file's weights, or random init
    probes = {n: json.loads((out / f"probe-{n}.json").read_text()) for n in cfgs}
    assert probes["pretrained"]["key"]["weights"] == str(weights)
    assert probes["random"]["key"]["weights"] is None
    for name, row in zip(("random", "pretrained"), rows):
        assert row["probe val macro-F1"] == round(probes[name]["linear_val_macro_f1"], 3)
        assert 0.0 <= row["probe test macro-F1"] <= 1.0
    # the pretrained file's features are the supervised run's: they separate the phantom
    # classes better than a random encoder's
    assert probes["pretrained"]["linear_val_macro_f1"] > probes["random"]["linear_val_macro_f1"]

    # re-running with one more init reuses the finished identical runs (and their probes)
    probe_stamp = (out / "probe-random.json").stat().st_mtime_ns
    stamp = (out / "random" / "metrics.json").stat().st_mtime_ns
    _invoke(*args, "--init", "random=random", "--init", f"again={weights}")
    assert (out / "random" / "metrics.json").stat().st_mtime_ns == stamp
    assert (out / "probe-random.json").stat().st_mtime_ns == probe_stamp
    assert len(json.loads((out / "compare.json").read_text())) == 2


def test_compare_arm_takes_the_backbone_its_pretraining_run_names(
    phantom_root, cache_dir, tmp_path
):
    """A VAE arm beside a ViT arm: the arm's architecture follows its encoder.json."""
    data = [f"data.path={phantom_root}", f"data.cache_dir={cache_dir}"]
    common = [*data, "eval.n_boot=20"]
    vae = tmp_path / "vae"
    _invoke("pretrain", "vae", "--preset", "tiny", *data, "optim.epochs=1", f"out_dir={vae}")
    assert json.loads((vae / "encoder.json").read_text())["backbone"] == "vae_encoder_32"
    out = tmp_path / "cmp"
    _invoke(
        "compare", "--preset", "tiny", *common, f"out_dir={out}", "optim.epochs=1",
        "--init", "random=random", "--init", f"vae={vae}",
    )  # fmt: skip
    rows = {r["init"]: r for r in json.loads((out / "compare.json").read_text())}
    vit = yaml.safe_load((out / "random" / "config.yaml").read_text())["model"]["name"]
    assert rows["random"]["model"] == vit != "vae_encoder_32"
    assert rows["vae"]["model"] == "vae_encoder_32"
    arm = yaml.safe_load((out / "vae" / "config.yaml").read_text())["model"]
    assert arm == {**arm, "name": "vae_encoder_32", "weights": str(vae)}
    # the arm really loaded the encoder: its first conv differs from a fresh init's only
    # by one epoch of fine-tuning, far less than two random inits differ
    pre, tuned = load_file(vae / "model.safetensors"), load_file(out / "vae" / "model.safetensors")
    key = next(k for k in pre if k.endswith("weight") and pre[k].ndim == 4)
    assert (tuned[key] - pre[key]).norm() < 0.5 * pre[key].norm()


def test_init_syntax_gives_an_arm_its_own_backbone():
    """NAME=WEIGHTS@MODEL: the ImageNet EfficientNet arm and its random twin beside ViT arms."""
    from dermkit.train.compare import parse_init
    from dermkit.train.settings import CompareArm, CompareRunConfig

    assert parse_init("mae=runs/mae") == ("mae", "runs/mae")
    assert parse_init("random=random") == ("random", None)
    name, arm = parse_init("imagenet=imagenet@tf_efficientnet_lite0")
    assert name == "imagenet" and arm == CompareArm(
        model="tf_efficientnet_lite0", weights="imagenet"
    )
    assert parse_init("twin=random@tf_efficientnet_lite0")[1].weights is None
    for bad in ("noequals", "x=", "x=imagenet@"):
        with pytest.raises(ValueError, match="NAME=WEIGHTS@MODEL"):
            parse_init(bad)
    # the same arms from a YAML config
    cfg = CompareRunConfig.model_validate(
        {
            "inits": {
                "random": None,
                "imagenet": {"model": "tf_efficientnet_lite0", "weights": "imagenet"},
            }
        }
    )
    assert isinstance(cfg.inits["imagenet"], CompareArm) and cfg.inits["random"] is None


def test_bare_overrides_address_the_shared_finetune_recipe():
    """`dermkit compare optim.epochs=3` fine-tunes every arm for 3 epochs; its own keys stay."""
    from dermkit.train.compare import compare_overrides

    given = ["optim.epochs=3", "seed=1", "out_dir=runs/c", "inits.mae=runs/mae", "finetune.seed=2"]
    assert compare_overrides(given) == [
        "finetune.optim.epochs=3",
        "finetune.seed=1",
        "out_dir=runs/c",
        "inits.mae=runs/mae",
        "finetune.seed=2",
    ]
