"""Where a classifier looks: attention rollout (ViTs), Grad-CAM (CNNs and ViTs), sanity check.

**Attention rollout** (Abnar & Zuidema 2020, "Quantifying attention flow in
transformers"): per block, the head-averaged attention A (N x N tokens) plus the identity
for the residual path, 0.5 A + 0.5 I, rows renormalised; the product over blocks says how
much each input token flows into the CLS token at the end. timm's ``Attention`` uses fused
``scaled_dot_product_attention``, which never materialises the attention matrix, so while
rolling out each block's ``fused_attn`` flag is switched off (timm's own explicit path:
softmax(q k^T / sqrt(d)) then ``attn_drop``) and a forward hook on ``attn_drop`` captures
its output, the attention probabilities (B, heads, N, N). The flags are restored after.
Written here because no maintained package implements rollout for timm models; it is a
dozen lines on top of timm's own attention code.

**Grad-CAM** (Selvaraju et al. 2017) comes from the maintained ``grad-cam`` package
(pytorch-grad-cam): for a CNN the target layer is timm's last feature stage
(``feature_info[-1]``); for a ViT it is the last block's ``norm1`` with a reshape that
drops the prefix (CLS/register) tokens and lays the patch tokens out on their grid. The
target is the class the run predicted; for an ordinal (CORN) head it is the expected class
sum_k P(y > k).

**Sanity check** (Adebayo et al. 2018, "Sanity checks for saliency maps"): a map that
barely changes when the weights are replaced by random ones explains the architecture, not
what was learned. Each map is recomputed on a copy of the model with every parameter
re-initialised (three copies by default: one random draw can happen to point the way the
trained weights do), and the Spearman rank correlation between trained and randomised maps
is reported, averaged over images and copies (low is good).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from torch import nn

from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import to_float
from dermkit.eval.plots import _new_figure, save_figure
from dermkit.eval.report import link_into_report
from dermkit.models.backbones import input_stats

log = logging.getLogger(__name__)


def is_vit(model: nn.Module) -> bool:
    """A timm VisionTransformer-like model: patch embedding + a stack of attention blocks."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


# ----------------------------------------------------------------------------- rollout


@contextmanager
def captured_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect each block's attention probabilities (B, heads, N, N) during forward passes."""
    maps: list[torch.Tensor] = []
    saved, handles = [], []
    for block in model.blocks:
        attn = block.attn
        if not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
            raise TypeError(f"{type(attn).__name__}: not a timm Attention; rollout needs one")
        saved.append(attn.fused_attn)
        attn.fused_attn = False  # take timm's explicit softmax path, whose output we hook
        handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o)))
    try:
        yield maps
    finally:
        for block, fused in zip(model.blocks, saved):
            block.attn.fused_attn = fused
        for h in handles:
            h.remove()


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention rollout maps (B, gh, gw) of normalised images x (B, 3, S, S), rows sum to 1.

    The map is the CLS token's row of the rolled-out attention over the patch tokens; a
    model without prefix tokens uses the mean row over all tokens.
    """
    if not is_vit(model):
        raise TypeError(f"attention rollout needs a ViT, got {type(model).__name__}")
    model.eval()
    with captured_attention(model) as maps:
        model(x)
    n = maps[0].shape[-1]
    eye = torch.eye(n, device=x.device)
    rollout = eye.expand(x.shape[0], n, n)
    for attn in maps:
        a = 0.5 * attn.float().mean(1) + 0.5 * eye  # heads averaged, residual path added
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    prefix = getattr(model, "num_prefix_tokens", 1)
    row = rollout[:, 0, prefix:] if prefix else rollout.mean(1)
    gh, gw = model.patch_embed.grid_size
    row = row[:, -gh * gw :]
    return (row / row.sum(-1, keepdim=True)).reshape(-1, gh, gw)


# ----------------------------------------------------------------------------- Grad-CAM


class ExpectedClassTarget:
    """Grad-CAM target of an ordinal CORN head: the expected class sum_k P(y > k)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.cumsum(nn.functional.logsigmoid(output), -1)).sum(-1)


def gradcam_layer(model: nn.Module) -> tuple[nn.Module, Callable | None]:
    """(target layer, reshape_transform or None) for Grad-CAM on a timm ViT or CNN."""
    if is_vit(model):
        prefix = getattr(model, "num_prefix_tokens", 1)
        gh, gw = model.patch_embed.grid_size

        def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
            """(B, N, C) tokens -> (B, C, gh, gw) patch tokens (prefix tokens dropped)."""
            t = t[:, prefix:, :]
            return t.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)

        return model.blocks[-1].norm1, tokens_to_grid
    info = getattr(model, "feature_info", None)
    if info:
        return model.get_submodule(info[-1]["module"]), None
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TypeError(f"{type(model).__name__}: no ViT blocks or conv layer for Grad-CAM")
    return convs[-1], None


def grad_cam(model: nn.Module, x: torch.Tensor, targets: list | None = None) -> np.ndarray:
    """Grad-CAM maps (B, S, S) in [0, 1] of normalised images x (B, 3, S, S).

    ``targets``: one pytorch-grad-cam target per image (e.g. ``ClassifierOutputTarget(k)``,
    :class:`ExpectedClassTarget`); None: each image's top logit.
    """
    from pytorch_grad_cam import GradCAM

    layer, reshape = gradcam_layer(model)
    model.eval()
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=targets)


def class_targets(indices: list[int] | np.ndarray, ordinal: bool) -> list:
    """Grad-CAM targets: the given class per image, or the expected class of an ordinal head."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if ordinal:
        return [ExpectedClassTarget() for _ in indices]
    return [ClassifierOutputTarget(int(k)) for k in indices]


# ----------------------------------------------------------------------------- sanity check


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy with every parameter re-initialised (Adebayo et al.'s full randomisation).

    Modules with ``reset_parameters`` (linear, conv, norm layers) use their own init; any
    other parameter (timm's cls_token, pos_embed...) gets N(0, 0.02^2), timm's ViT init.
    """
    clone = copy.deepcopy(model)
    torch.manual_seed(seed)
    done: set[int] = set()
    for module in clone.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            done.update(id(p) for p in module.parameters(recurse=False))
    with torch.no_grad():
        for p in clone.parameters():
            if id(p) not in done:
                nn.init.trunc_normal_(p, std=0.02)
    return clone.eval()


def rank_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho per image between maps a and b (B, ...); NaN where a map is constant."""
    out = []
    for u, v in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        out.append(np.nan if np.ptp(u) == 0 or np.ptp(v) == 0 else spearmanr(u, v)[0])
    return np.asarray(out, np.float64)


def saliency_maps(model: nn.Module, x: torch.Tensor, targets: list | None) -> dict[str, np.ndarray]:
    """{method: maps (B, h, w)}: Grad-CAM always, attention rollout for ViTs."""
    maps = {"gradcam": grad_cam(model, x, targets)}
    if is_vit(model):
        maps["rollout"] = attention_rollout(model, x).cpu().numpy()
    return maps


def sanity_check(
    model: nn.Module, x: torch.Tensor, targets: list | None, seed: int = 0, n_random: int = 3
) -> tuple[dict, dict, dict]:
    """Maps of the trained model and of ``n_random`` randomised copies, and their correlation.

    One random draw can happen to point the same way as the trained weights (a random
    projection of colour still follows the lesion), so rho is averaged over several.

    Returns ``(trained maps, maps of the first random copy, {method: {"mean", "median",
    "per_seed", "per_image"}})``; per_image: rho per image averaged over the copies.
    """
    trained = saliency_maps(model, x, targets)
    rhos: dict[str, list[np.ndarray]] = {m: [] for m in trained}
    first = None
    for r in range(max(1, n_random)):
        random = saliency_maps(randomized_copy(model, seed + r), x, targets)
        first = first or random
        for method in trained:
            rhos[method].append(rank_correlations(trained[method], random[method]))
    stats = {}
    for method, runs in rhos.items():
        rho = np.stack(runs)  # (n_random, B)
        ok = np.isfinite(rho).any()
        stats[method] = {
            "mean": float(np.nanmean(rho)) if ok else None,
            "median": float(np.nanmedian(rho)) if ok else None,
            "per_seed": [float(np.nanmean(v)) if np.isfinite(v).any() else None for v in rho],
            "per_image": np.nanmean(rho, 0).tolist() if ok else [],
        }
    return trained, first, stats


# ----------------------------------------------------------------------------- figures


def _upsample(m: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.asarray(m, np.float32))[None, None]
    up = nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    up = up[0, 0].numpy()
    return (up - up.min()) / (np.ptp(up) or 1.0)


def plot_overlays(
    images: np.ndarray, maps: dict[str, np.ndarray], titles: list[str], columns: list[str]
) -> Figure:
    """Rows of [image, map overlays...]: images (B, S, S, 3) uint8, maps {name: (B, h, w)}."""
    n = len(images)
    fig = _new_figure(2.0 * (1 + len(columns)), 2.1 * n)
    axes = np.asarray(fig.subplots(n, 1 + len(columns), squeeze=False))
    size = images.shape[1]
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title(titles[i], fontsize=7)
        for j, name in enumerate(columns, start=1):
            axes[i, j].imshow(images[i])
            axes[i, j].imshow(_upsample(maps[name][i], size), cmap="jet", alpha=0.45)
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    return fig


# ----------------------------------------------------------------------------- the command


def _choose_examples(pred_frame: pd.DataFrame, classes: list[str], per_class: int, seed: int):
    """{class: {"correct": rows, "wrong": rows}} of up to ``per_class`` test images each."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in classes:
        own = pred_frame[pred_frame["label"] == c]
        groups = {"correct": own[own["pred"] == c], "wrong": own[own["pred"] != c]}
        out[c] = {
            k: g.iloc[np.sort(rng.permutation(len(g))[:per_class])] for k, g in groups.items()
        }
    return out


def _predictions(run, dataset: CachedImageDataset, part: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows: image_id, label, pred, p_pred; from the run's predictions file, else the model."""
    path = run.path / f"predictions_{split}.csv"
    if path.exists():
        df = pd.read_csv(path, dtype={"image_id": str, "label": str, "pred": str})
        probs = df[[f"prob_{c}" for c in run.classes]].to_numpy()
        df["p_pred"] = probs.max(1)
        return df[["image_id", "label", "pred", "p_pred"]]
    from dermkit.tasks.ordinal import corn_class_probs

    x = to_float(dataset.__getitems__(np.arange(len(dataset)))[0], *input_stats(run.model))
    with torch.no_grad():
        logits = run.model(x)
    probs = corn_class_probs(logits) if run.ordinal else logits.softmax(-1)
    pred = probs.argmax(-1).numpy()
    return pd.DataFrame(
        {
            "image_id": part["image_id"].to_numpy(),
            "label": part["label"].to_numpy(),
            "pred": np.asarray(run.classes)[pred],
            "p_pred": probs.max(-1).values.numpy(),
        }
    )


def run_explain_saliency(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    data_path: str | Path | None = None,
    split: str = "test",
    per_class: int = 2,
    sanity_images: int = 16,
    seed: int = 0,
    random_copies: int = 3,
) -> Path:
    """``dermkit explain saliency RUN``: overlays per class (correct and wrong) + sanity check.

    Writes ``saliency/`` PNGs, ``saliency_metrics.json`` and ``report.html`` into ``out_dir``
    (default ``RUN/explain-saliency``); returns the report path.
    """
    from dermkit.eval.report import HtmlReport, to_jsonable
    from dermkit.tasks.runs import open_run, run_data

    run = open_run(run_dir)
    data = run_data(run, data_path)
    part = data.part(split)
    if run.ordinal is not None:
        part = run.ordinal.relabel(part[~run.ordinal.missing(part)].reset_index(drop=True))
    dataset = CachedImageDataset(data.cache, part, run.classes)
    out = Path(out_dir) if out_dir else run.path / "explain-saliency"
    (out / "saliency").mkdir(parents=True, exist_ok=True)
    model = run.model.float()
    index = {c: i for i, c in enumerate(run.classes)}
    rows_of = {image_id: i for i, image_id in enumerate(part["image_id"])}
    preds = _predictions(run, dataset, part, split)
    preds = preds[preds["image_id"].isin(rows_of)]
    methods = ["gradcam", *(["rollout"] if is_vit(model) else [])]

    report = HtmlReport(f"dermkit explain saliency: {run.cfg.model.name} ({split})")
    report.add_paragraph(
        f"Methods: {', '.join(methods)}. Grad-CAM explains the predicted class"
        + (" (ordinal head: the expected class)" if run.ordinal else "")
        + "; attention rollout is class-agnostic (what reaches the CLS token)."
    )
    examples = _choose_examples(preds, run.classes, per_class, seed)
    for c in run.classes:
        chosen = pd.concat([examples[c]["correct"], examples[c]["wrong"]])
        report.add_heading(f"class {c}", level=2)
        if not len(chosen):
            report.add_paragraph(f"no {split} images of class {c}")
            continue
        rows = np.asarray([rows_of[i] for i in chosen["image_id"]])
        images, _ = dataset.__getitems__(rows)
        x = to_float(images, *input_stats(model))
        targets = class_targets([index[p] for p in chosen["pred"]], run.ordinal is not None)
        maps = saliency_maps(model, x, targets)
        titles = [
            f"{'ok' if r.pred == r.label else 'WRONG'}: true {r.label}, pred {r.pred} "
            f"({r.p_pred:.2f})"
            for r in chosen.itertuples()
        ]
        name = f"saliency/class_{c}.png".replace(" ", "_").replace(">", "gt").replace("<", "lt")
        fig = plot_overlays(images.permute(0, 2, 3, 1).numpy(), maps, titles, methods)
        save_figure(fig, out / name)
        n_ok, n_wrong = len(examples[c]["correct"]), len(examples[c]["wrong"])
        report.add_figure(out / name, f"{c}: {n_ok} correct and {n_wrong} wrong predictions.")

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(dataset))[: max(1, sanity_images)])
    images, _ = dataset.__getitems__(pick)
    by_id = preds.set_index("image_id")["pred"]
    pred_idx = [index[by_id.get(i, run.classes[0])] for i in part["image_id"].to_numpy()[pick]]
    trained, random, stats = sanity_check(
        model,
        to_float(images, *input_stats(model)),
        class_targets(pred_idx, run.ordinal is not None),
        seed,
        random_copies,
    )
    report.add_heading("Sanity check: trained vs randomised weights (Adebayo et al. 2018)")
    report.add_paragraph(
        "Spearman rank correlation between each image's map from the trained model and from "
        "a copy with every weight re-initialised. A faithful map depends on what was learned, "
        "so the correlation should be low; a high one means the map mostly reflects the "
        "architecture or the image."
    )
    report.add_table(
        [
            {
                "method": m,
                "images": len(pick),
                "random copies": len(s["per_seed"]),
                "mean rho": s["mean"],
                "median rho": s["median"],
            }
            for m, s in stats.items()
        ],
        "Rank correlation trained vs randomised",
    )
    k = min(4, len(pick))
    sanity_maps = {
        **{f"{m} trained": v[:k] for m, v in trained.items()},
        **{f"{m} random": v[:k] for m, v in random.items()},
    }
    cols = [f"{m} {w}" for m in methods for w in ("trained", "random")]
    titles = [f"image {i}" for i in part["image_id"].to_numpy()[pick[:k]]]
    fig = plot_overlays(images[:k].permute(0, 2, 3, 1).numpy(), sanity_maps, titles, cols)
    save_figure(fig, out / "saliency" / "sanity.png")
    report.add_figure(out / "saliency" / "sanity.png", "Trained vs randomised maps.")
    metrics = {"split": split, "methods": methods, "sanity_rank_correlation": stats}
    (out / "saliency_metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2))
    report.add_link("saliency_metrics.json", "saliency_metrics.json")
    path = report.write(out / "report.html")
    link_into_report(run.path / "report.html", path, "explain: saliency maps")
    return path
