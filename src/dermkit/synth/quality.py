"""``dermkit synth quality``: are the synthetic images faithful, diverse, useful and new?

* fidelity/diversity: Fréchet distance, KID and improved precision/recall between the real
  TRAIN split and the synthetic set, overall and per class, in the feature space of a
  dermkit encoder (``features: encoder``), a local torchvision Inception-v3 file
  (``inception``), or the classical colour/texture features (``classical``);
* usefulness: TSTR (train on synthetic only, test on the real test split) against TRTR
  (train on the real train split, same test), with the classical baseline (default) or the
  fine-tuning loop at a small budget; both select on the real val split;
* memorisation: a synthetic image is flagged when its nearest real training image is closer
  than the ``memorisation_percentile`` (1st) percentile of real-to-real nearest-neighbour
  distances (other lesions only: views of one lesion are near-copies by design), in
  feature space, pixel space (32 px), or both.

Writes ``quality.json``, ``memorisation.csv``, ``report.html`` (with the closest pairs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dermkit.config import ConfigError
from dermkit.data.cache import build_cache
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.manifest import read_synthetic_rows
from dermkit.data.prepare import images_for, prepare_data
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.report import HtmlReport
from dermkit.runs import RunDir
from dermkit.synth.filtering import (
    is_classifier_run,
    load_real_classifier,
    memorisation,
    thumbnails,
)
from dermkit.synth.images import save_grid
from dermkit.synth.metrics import (
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from dermkit.synth.settings import QualityConfig
from dermkit.synth.training import write_json
from dermkit.train.settings import FinetuneRunConfig

log = logging.getLogger(__name__)


def feature_function(cfg: QualityConfig):
    """(name, fn) where fn maps uint8 images (N, S, S, 3) to features (N, D) float32."""
    from dermkit.synth.encoders import (
        InceptionPool,
        encoder_pooled,
        extract_features,
        load_domain_encoder,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.features == "encoder":
        if not cfg.encoder:
            raise ConfigError("features=encoder needs encoder= (a dermkit run folder)")
        net = load_domain_encoder(cfg.encoder).to(device)
        return f"encoder {cfg.encoder}", lambda im: extract_features(
            lambda x: encoder_pooled(net, x), im, device=device
        )
    if cfg.features == "inception":
        if not cfg.inception_weights:
            raise ConfigError("features=inception needs inception_weights= (a local file)")
        net = InceptionPool(cfg.inception_weights).to(device)
        return f"inception {cfg.inception_weights}", lambda im: extract_features(
            net, im, device=device
        )
    from dermkit.models.classical import extract_features as classical

    return "classical colour/texture features", classical


def distribution_metrics(real: np.ndarray, fake: np.ndarray, cfg: QualityConfig) -> dict:
    """FD, KID, precision and recall of two feature sets; None where a set has < 2 rows."""
    row: dict = {"n_real": len(real), "n_synthetic": len(fake)}
    if len(real) < 2 or len(fake) < 2:
        return row | {"fd": None, "kid": None, "kid_std": None, "precision": None, "recall": None}
    kid, kid_std = kernel_inception_distance(
        real, fake, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed
    )
    precision, recall = precision_recall(real, fake, cfg.pr_k)
    return row | {
        "fd": frechet_distance(real, fake),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


def _fit_classical(cfg, train_x, train_y, val_x, val_y, test_x, n_classes) -> np.ndarray:
    from dermkit.models.classical import ClassicalBaseline

    settings = cfg.tstr.baseline.model_dump(exclude={"metadata"})  # empty: TstrConfig checks
    model = ClassicalBaseline(n_classes=n_classes, seed=cfg.seed, **settings)
    model.fit(train_x, train_y, val_x, val_y)
    return model.predict_proba(test_x)


def _fit_finetune(cfg, train_ds, val_ds, test_ds, run_dir: Path) -> np.ndarray:
    from dermkit.models.backbones import create_backbone
    from dermkit.train.loop import load_best, make_accelerator, predict_logits, train_classifier

    ft = FinetuneRunConfig(
        seed=cfg.seed,
        out_dir=str(run_dir),
        data=cfg.data,
        model=cfg.tstr.model,
        optim=cfg.tstr.optim,
        loss=cfg.tstr.loss,
        eval=cfg.eval,
    )
    torch.manual_seed(cfg.seed)
    model = create_backbone(
        ft.model.name,
        num_classes=len(train_ds.class_names),
        img_size=cfg.data.image_size,
        drop_path_rate=ft.model.drop_path_rate,
    )
    if ft.model.weights:
        from dermkit.models.weights import load_pretrained

        load_pretrained(model, ft.model.weights)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(ft.optim.precision)
    train_classifier(ft, model, train_ds, val_ds, run_dir, accelerator=accelerator, progress=False)
    model = load_best(model, run_dir)
    logits = predict_logits(model, test_ds, np.arange(len(test_ds)), accelerator)
    return logits.softmax(1).numpy()


def tstr_trtr(cfg: QualityConfig, data, synth_df, synth_cache, run_dir: Path) -> dict | None:
    """Macro-F1 / balanced accuracy on the real test split of TSTR and TRTR classifiers."""
    if cfg.tstr.method == "none":
        return None
    present = sorted(set(synth_df["label"]))
    if len(present) < 2:
        # A classifier needs two classes; e.g. a "uniform" set has no majority-class images.
        return {"method": cfg.tstr.method, "skipped": f"synthetic set has only {present}"}
    classes = data.classes
    index = {c: i for i, c in enumerate(classes)}
    parts = {s: data.part(s) for s in ("train", "val", "test")}
    y = {s: p["label"].map(index).to_numpy() for s, p in parts.items()}
    y_syn = synth_df["label"].map(index).to_numpy()
    probs = {}
    if cfg.tstr.method == "classical":
        from dermkit.models.classical import extract_features

        f = {s: extract_features(images_for(data, p)) for s, p in parts.items()}
        f_syn = extract_features(synth_cache.load(synth_df["image_id"]))
        n = len(classes)
        probs["tstr"] = _fit_classical(cfg, f_syn, y_syn, f["val"], y["val"], f["test"], n)
        probs["trtr"] = _fit_classical(
            cfg, f["train"], y["train"], f["val"], y["val"], f["test"], n
        )
    else:
        ds = {s: CachedImageDataset(data.cache, p, classes) for s, p in parts.items()}
        syn_ds = CachedImageDataset(synth_cache, synth_df, classes)
        probs["tstr"] = _fit_finetune(cfg, syn_ds, ds["val"], ds["test"], run_dir / "tstr")
        probs["trtr"] = _fit_finetune(cfg, ds["train"], ds["val"], ds["test"], run_dir / "trtr")
    out = {"method": cfg.tstr.method}
    for name, p in probs.items():
        result = evaluate_predictions(
            y["test"],
            p,
            classes,
            groups=parts["test"]["lesion_id"].to_numpy(),
            n_boot=cfg.eval.n_boot,
            ci=cfg.eval.ci,
            seed=cfg.seed,
            positive_class=cfg.eval.positive_class,
        )
        out[name] = {k: result["metrics"][k] for k in ("macro_f1", "balanced_accuracy")}
    trtr = out["trtr"]["macro_f1"]["value"]
    out["tstr_over_trtr_macro_f1"] = out["tstr"]["macro_f1"]["value"] / trtr if trtr else None
    return out


def class_agreement(
    run: str | Path,
    classes: list[str],
    syn_im: np.ndarray,
    syn_labels: np.ndarray,
    real_im: np.ndarray,
    real_labels: np.ndarray,
) -> list[dict]:
    """Does a real-trained classifier see the requested class in the synthetic images?

    Per class: the share of synthetic images of class c that the classifier of ``run``
    (trained on real images; a classifier or baseline run, see ``synth/filtering.py``)
    labels c, beside its recall on held-out real images of c (the ceiling a faithful
    generator could reach). Conditioning that works puts the two close.

    Args:
        syn_im, real_im: uint8 (N, S, S, 3); syn_labels, real_labels: (N,) class names.
    """
    classifier = load_real_classifier(run, purpose="synthetic-image quality")
    if classifier.classes != list(classes):
        raise ConfigError(f"{run}: classifier classes {classifier.classes} differ from {classes}")
    syn_pred, real_pred = classifier.predict(syn_im), classifier.predict(real_im)
    rows = []
    for c in classes:
        s, r = syn_labels == c, real_labels == c
        if s.any():
            rows.append(
                {
                    "class": c,
                    "n_synthetic": int(s.sum()),
                    "synthetic_agreement": float((syn_pred[s] == c).mean()),
                    "real_recall": float((real_pred[r] == c).mean()) if r.any() else None,
                }
            )
    return rows


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n)[:limit])


def run_quality(cfg: QualityConfig, progress: bool = True) -> Path:
    """Compute every quality measure; returns the path of report.html."""
    with RunDir(cfg.out_dir, cfg, "synth_quality") as run:
        data = prepare_data(cfg.data, rejects_path=run / "rejects.csv", progress=progress)
        synth_df = read_synthetic_rows(cfg.synthetic_manifest)
        if len(synth_df) == 0:
            raise ConfigError(f"{cfg.synthetic_manifest}: no (kept) synthetic rows")
        unknown = sorted(set(synth_df["label"]) - set(data.classes))
        if unknown:
            raise ConfigError(f"{cfg.synthetic_manifest}: labels {unknown} not in {data.classes}")
        synth_cache = build_cache(
            synth_df, cfg.data.image_size, cfg.data.crop, cfg.data.cache_dir, progress=progress
        )
        rng = np.random.default_rng(cfg.seed)
        real_df = data.part("train")
        real_df = real_df.iloc[_subsample(len(real_df), cfg.max_images, rng)].reset_index(drop=True)
        syn_df = synth_df.iloc[_subsample(len(synth_df), cfg.max_images, rng)].reset_index(
            drop=True
        )
        real_im, syn_im = images_for(data, real_df), synth_cache.load(syn_df["image_id"])

        # --- fidelity / diversity, overall and per class
        space, features = feature_function(cfg)
        f_real, f_syn = features(real_im), features(syn_im)
        table = [{"class": "all", **distribution_metrics(f_real, f_syn, cfg)}]
        for c in data.classes:
            r, s = (real_df["label"] == c).to_numpy(), (syn_df["label"] == c).to_numpy()
            if s.any():
                table.append({"class": c, **distribution_metrics(f_real[r], f_syn[s], cfg)})

        # --- class conditioning, when the feature encoder is a classifier run
        agreement = None
        if cfg.features == "encoder" and is_classifier_run(cfg.encoder):
            # Real val images (unseen by the classifier) give the recall a faithful
            # generator could reach; train images would overstate it.
            val_df = data.part("val")
            agreement = class_agreement(
                cfg.encoder,
                data.classes,
                syn_im,
                syn_df["label"].to_numpy(),
                images_for(data, val_df),
                val_df["label"].to_numpy(),
            )

        # --- memorisation
        spaces = {}
        if cfg.memorisation_space in ("feature", "both"):
            spaces["feature"] = (f_real, f_syn)
        if cfg.memorisation_space in ("pixel", "both"):
            spaces["pixel"] = (thumbnails(real_im), thumbnails(syn_im))
        mem = syn_df[["image_id", "label"]].copy()
        thresholds = {}
        lesions = real_df["lesion_id"].to_numpy()
        for name, (r, s) in spaces.items():
            nn, thresholds[name] = memorisation(r, lesions, s, cfg.memorisation_percentile)
            mem[f"{name}_distance"] = nn["distance"].to_numpy()
            mem[f"{name}_nearest_real"] = real_df["image_id"].to_numpy()[nn["nearest"]]
            mem[f"{name}_flagged"] = nn["flagged"].to_numpy()
        mem["flagged"] = mem[[f"{n}_flagged" for n in spaces]].any(axis=1)
        mem.to_csv(run / "memorisation.csv", index=False)

        # --- usefulness
        tstr = tstr_trtr(cfg, data, synth_df, synth_cache, run.path)

        result = {
            "feature_space": space,
            "real_reference": "train split",
            "metrics": table,
            "memorisation": {
                "percentile": cfg.memorisation_percentile,
                "thresholds": thresholds,
                "flagged": int(mem["flagged"].sum()),
                "flagged_share": float(mem["flagged"].mean()),
                "checked": len(mem),
            },
            "tstr": tstr,
            "class_agreement": agreement,
        }
        write_json(result, run / "quality.json")
        return _report(run.path, result, mem, real_im, syn_im, real_df, spaces)


def _report(run_dir, result, mem, real_im, syn_im, real_df, spaces) -> Path:
    report = HtmlReport("dermkit synth quality: fidelity, diversity, usefulness, memorisation")
    report.add_paragraph(
        f"Feature space: {result['feature_space']}; reference: the real train split. "
        "FD/KID: lower is closer; precision: share of synthetic images on the real manifold; "
        "recall: share of real images covered by the synthetic manifold."
    )
    report.add_table(result["metrics"], caption="Fréchet distance, KID, precision, recall")
    if result.get("class_agreement"):
        report.add_table(
            result["class_agreement"],
            caption="Class conditioning: share of each class's synthetic images that the "
            "encoder's classifier (trained on real images) labels as that class, beside its "
            "recall on the real val images of the class",
        )
    if result["tstr"] and "skipped" in result["tstr"]:
        report.add_paragraph(f"TSTR/TRTR skipped: {result['tstr']['skipped']}")
    elif result["tstr"]:
        t = result["tstr"]
        rows = [
            {
                "trained on": name.upper(),
                "macro-F1": t[name]["macro_f1"]["value"],
                "balanced accuracy": t[name]["balanced_accuracy"]["value"],
            }
            for name in ("tstr", "trtr")
        ]
        report.add_table(rows, caption=f"Real test split, {t['method']} classifier")
    m = result["memorisation"]
    report.add_paragraph(
        f"Memorisation: {m['flagged']} of {m['checked']} synthetic images are closer to a real "
        f"training image than the {m['percentile']}th percentile of real-to-real "
        f"nearest-neighbour distances (thresholds {m['thresholds']})."
    )
    name = "feature" if "feature" in spaces else "pixel"
    closest = mem.sort_values(f"{name}_distance").head(8)
    if len(closest):
        pos = {i: k for k, i in enumerate(real_df["image_id"])}
        pairs = []
        for row in closest.itertuples():
            pairs += [syn_im[row.Index], real_im[pos[getattr(row, f"{name}_nearest_real")]]]
        save_grid(np.stack(pairs), run_dir / "closest_pairs.png", nrow=4)
        report.add_figure(
            run_dir / "closest_pairs.png",
            caption=f"The closest synthetic/real pairs ({name} space): synthetic, nearest real",
        )
    report.add_link("quality.json", "quality.json")
    report.add_link("memorisation.csv", "memorisation.csv")
    return report.write(run_dir / "report.html")
