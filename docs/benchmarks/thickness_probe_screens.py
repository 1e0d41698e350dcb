"""Issue 21, the last levers on frozen features: mid-level layers, non-linear probes, fusion.

The thickness study (``dermkit thickness study``) probes the pooled *last* layer of each
backbone with a linear head. Three things it did not try, each a common fix when ImageNet
features transfer poorly to a texture-heavy medical task:

- **mid-level layers**: ImageNet EfficientNet-Lite0 stages 2-6 (strides 4-32), each pooled
  to its per-channel mean and standard deviation (first- and second-order texture
  statistics), alone and concatenated;
- **a non-linear probe**: an RBF support-vector machine (class-balanced), C and gamma
  chosen by inner CV, on the raw features and on 32 PCA components;
- **fusion** of the ImageNet features with the classical colour + texture features.

Same protocol as the study: 247 melanomas, 3-class grouping, stratified 5-fold CV x seeds
0-2, every choice made on a 3-fold inner CV of the outer training fold (the linear probes
through the study's own ``nested_cv``: CORN and softmax heads, class-weighted, L2 C in
0.001-0.03). Prints the fold mean [95% t-interval] of balanced accuracy over 15 folds.

    python docs/benchmarks/thickness_probe_screens.py   # ~4 min on one core
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from dermkit.data.thickness import GROUPINGS, load_thickness
from dermkit.explain import thickness as T
from dermkit.explain.thickness_cv import candidate_grid, mean_ci, nested_cv

DATA = "../shared/data/derm7pt-thickness"
SIZE = 160  # the shared copy's own size, the study's best Lite0 input
SEEDS = (0, 1, 2)


@torch.no_grad()
def stage_features(model, images: np.ndarray, mean, std) -> dict[str, np.ndarray]:
    """{name: (N, D)}: mean+std pooled outputs of Lite0 stages 2-6 and the pooled head.

    Each is the average over the image and its two flips (the study's ``+tta``).
    """
    per: dict[str, list] = {}
    for start in range(0, len(images), 32):
        x = T.to_input(images[start : start + 32], mean, std)
        views: dict[str, list] = {}
        for v in (x, x.flip(-1), x.flip(-2)):
            h = model.bn1(model.conv_stem(v))
            for i, block in enumerate(model.blocks):
                h = block(h)
                if 1 <= i <= 5:
                    pooled = torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)
                    views.setdefault(f"stage{i + 1}", []).append(pooled)
            views.setdefault("head", []).append(model.bn2(model.conv_head(h)).mean((2, 3)))
        for name, v in views.items():
            per.setdefault(name, []).append(torch.stack(v).mean(0))
    return {name: torch.cat(v).double().numpy() for name, v in per.items()}


def standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def linear_probe(x: np.ndarray, y: np.ndarray) -> dict:
    """The study's nested CV over CORN/softmax x C (class-weighted): the selected row."""
    grid = candidate_grid(["f"], cs=(0.001, 0.003, 0.01, 0.03), balanced=(True,))
    result = nested_cv({"f": x}, y, 3, grid, seeds=SEEDS)["selected"]
    return mean_ci([f["balanced_accuracy"] for f in result.folds])


def svm_probe(x: np.ndarray, y: np.ndarray, pca: int | None) -> dict:
    """RBF SVM (class-balanced), C (and gamma without PCA) chosen on the inner CV."""
    steps = [StandardScaler()] + ([PCA(pca)] if pca else []) + [SVC(class_weight="balanced")]
    grid = {"svc__C": [0.3, 1, 3, 10]}
    if not pca:
        grid["svc__gamma"] = ["scale", 3e-4, 1e-3]
    scores = []
    for seed in SEEDS:
        for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
            inner = StratifiedKFold(3, shuffle=True, random_state=seed)
            search = GridSearchCV(
                make_pipeline(*steps), grid, scoring="balanced_accuracy", cv=inner
            )
            search.fit(x[train], y[train])
            scores.append(balanced_accuracy_score(y[test], search.predict(x[test])))
    return mean_ci(scores)


def main() -> None:
    torch.set_num_threads(1)
    manifest = load_thickness(DATA)
    y = GROUPINGS["3class"].classes_of(manifest["thickness_class"].to_numpy())
    spec = T.FeatureSpec.parse(f"tf_efficientnet_lite0@{SIZE}:imagenet")
    model, mean, std = T.build_encoder(spec)
    images = T.load_images(manifest, SIZE, None)
    features = stage_features(model, images, mean, std)
    classical = T.extract(None, images, mean, std, tta=False)
    features = {name: standardise(f) for name, f in features.items()}
    features["stages 3-5"] = np.concatenate([features[f"stage{i}"] for i in (3, 4, 5)], 1)
    features["head + classical"] = np.concatenate([features["head"], standardise(classical)], 1)

    def show(name: str, probe: str, m: dict) -> None:
        print(f"| {name} | {probe} | {m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}] |")

    print("| Lite0@160 features | probe | balanced accuracy, 3-class |\n| --- | --- | --- |")
    for name, x in features.items():
        show(name, "linear (CORN/softmax, nested)", linear_probe(x, y))
    for name in ("head", "head + classical"):
        show(name, "RBF SVM", svm_probe(features[name], y, pca=None))
        show(name, "PCA-32 + RBF SVM", svm_probe(features[name], y, pca=32))


if __name__ == "__main__":
    main()
