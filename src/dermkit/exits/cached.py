"""``dermkit exits train`` with ``exits.features: cached``: pooled heads on features computed once.

With the backbone frozen and a pooled exit head (global average pool, then a linear layer
or an MLP: the CNN heads, ``heads.PooledMapHead``), a head only ever sees the pooled
vector (B, C_j) of the map after its block. So one inference pass of the frozen backbone
over train/val/test computes every exit's input (and the final logits), and the heads
train on those vectors. That costs one pass instead of one per epoch: a Lite0 pass over
HAM10000 at 128 px takes minutes on the 2-core CPU, each head epoch milliseconds. The
price is no augmentation (each train image is seen as it is), which matters little for
a linear or MLP classifier on 16-320 pooled features whose epoch is chosen on val.

The pass runs in ONNX Runtime (one graph: images -> pooled features per exit + final
logits, exported from the model itself), about 3x faster than PyTorch eager for this
depthwise-convolution network on the 2-core CPU. Its features are cached in the run
folder (``features.safetensors``, per block depth, so any exit placement reuses them).

Training runs on the engine as in ``exits/train.py`` (``exits/fitting.py``): the base
run's loss (hard labels, optionally self-distillation from the final exit), AdamW with
warm-up + cosine, the base run's sampler, checkpoints and ``--resume``, and per head type
the epoch with the best val macro-F1 averaged over the exits kept. It runs in one
process: an epoch of heads on pooled vectors takes milliseconds, nothing to share out.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dermkit.config import ConfigError
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import to_float
from dermkit.exits.fitting import BestPerHeadType, fit_exit_heads
from dermkit.exits.heads import PooledMapHead
from dermkit.exits.model import EarlyExitModel
from dermkit.exits.run_io import base_data, check_classes, head_kwargs, write_exit_run
from dermkit.exits.settings import ExitsRunConfig
from dermkit.models.backbones import input_stats
from dermkit.models.runs_io import load_run_model
from dermkit.runs import RunDir
from dermkit.train.engine import Batch, EpochEnd, Rows, make_accelerator
from dermkit.train.kd import KDLoss
from dermkit.train.losses import ClassificationLoss, sampling_weights

log = logging.getLogger(__name__)

FEATURES = "features.safetensors"
SPLITS = ("train", "val", "test")


class PooledTaps(nn.Module):
    """Images (B, 3, S, S) -> (pooled map after each depth in ``depths`` (B, C_d)...,
    final logits (B, C)): the frozen backbone's pass that feeds pooled exit heads."""

    def __init__(self, model: EarlyExitModel, depths: list[int]):
        super().__init__()
        self.model, self.depths = model, sorted(depths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, h, done, out = self.model, self.model.embed(x), 0, []
        for d in self.depths:
            h = m.run_blocks(h, done, d)
            out.append(h.mean((2, 3)))
            done = d
        h = m.run_blocks(h, done, m.depth)
        return (*out, m.exit_logits(h, m.n_exits - 1))


@torch.no_grad()
def pooled_features(
    model: EarlyExitModel, ds: CachedImageDataset, depths: list[int], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """{"block_{d}": (N, C_d) pooled maps after d blocks, "final": (N, C) logits} for ``ds``,
    computed in ONNX Runtime on ``torch.get_num_threads()`` threads (fp32)."""
    from dermkit.core.onnx import cpu_session

    taps = PooledTaps(model, depths).eval()  # a module left training would train the backbone
    stats = input_stats(model.backbone)
    names = [f"block_{d}" for d in taps.depths] + ["final"]
    size = ds.__getitems__(np.arange(1))[0].shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taps.onnx"
        with warnings.catch_warnings():  # tracer warnings on python-int shape arithmetic
            warnings.simplefilter("ignore")
            torch.onnx.export(
                taps,
                (torch.zeros(2, 3, size, size),),
                str(path),
                input_names=["images"],
                output_names=names,
                dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
                opset_version=17,
                dynamo=False,
            )
        session = cpu_session(path, torch.get_num_threads())
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i in range(0, len(ds), batch_size):
            x, _ = ds.__getitems__(np.arange(i, min(i + batch_size, len(ds))))
            for n, v in zip(names, session.run(None, {"images": to_float(x, *stats).numpy()})):
                out[n].append(v)
    return {n: np.concatenate(v) for n, v in out.items()}


def cached_features(
    run: Path, model: EarlyExitModel, ds: dict[str, CachedImageDataset]
) -> dict[str, dict[str, np.ndarray]]:
    """{split: pooled_features(...)} for the model's early exits, from ``run/features.safetensors``
    when it holds them (written by an earlier run in this folder), else computed and saved."""
    path = Path(run) / FEATURES
    depths = list(model.exit_blocks)
    want = [f"block_{d}" for d in depths] + ["final"]
    if path.exists():
        saved = {k: v.numpy() for k, v in load_file(path).items()}
        if all(f"{s}/{k}" in saved for s in SPLITS for k in want) and all(
            len(saved[f"{s}/final"]) == len(ds[s]) for s in SPLITS
        ):
            log.info("reusing the pooled features in %s", path)
            return {s: {k: saved[f"{s}/{k}"] for k in want} for s in SPLITS}
    feats = {}
    for s in SPLITS:
        log.info("pooled features of %d %s images", len(ds[s]), s)
        feats[s] = pooled_features(model, ds[s], depths)
    flat = {f"{s}/{k}": torch.from_numpy(v) for s, f in feats.items() for k, v in f.items()}
    save_file(flat, path)
    return feats


def _check(models: dict[str, EarlyExitModel], cfg: ExitsRunConfig) -> None:
    if cfg.exits.mode != "frozen":
        raise ConfigError("exits.features=cached trains heads on a frozen backbone (mode=frozen)")
    for h, m in models.items():
        if not all(isinstance(head, PooledMapHead) for head in m.heads):
            raise ConfigError(
                f"exits.features=cached needs pooled heads (a CNN backbone); {h} heads on a "
                f"{m.parts.family} read more than a pooled vector"
            )


def exit_logits(model: EarlyExitModel, feats: dict[str, np.ndarray]) -> np.ndarray:
    """Every exit's logits (E, N, C) from one split's pooled features: the heads'
    classifiers on them, then the cached final logits."""
    return _logits(model.heads, model.exit_blocks, feats)


@torch.no_grad()
def _logits(heads: nn.ModuleList, blocks: list[int], feats: dict[str, np.ndarray]) -> np.ndarray:
    device = next(heads.parameters()).device
    early = [
        head.classifier(torch.from_numpy(feats[f"block_{d}"]).to(device)).float().cpu().numpy()
        for head, d in zip(heads, blocks)
    ]
    return np.stack([*early, feats["final"]]).astype(np.float32)


class PooledHeads(nn.ModuleDict):
    """What the engine trains: {head type: its exit heads}; ``forward`` returns every head
    type's loss, the mean over its early exits (as frozen live training does)."""

    def __init__(self, models: dict[str, EarlyExitModel], kd: KDLoss):
        super().__init__({h: m.heads for h, m in models.items()})
        self.__dict__["kd"] = kd  # not registered: the heads alone are trained and saved

    def forward(
        self, pooled: list[torch.Tensor], final: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Pooled features per early exit [(b, C_j)], final logits (b, C), labels (b,)."""
        return {
            h: torch.stack(
                [self.kd(head.classifier(p), final, y) for head, p in zip(heads, pooled)]
            ).mean()
            for h, heads in self.items()
        }


class CachedHeadTraining(BestPerHeadType):
    """The engine's method for pooled heads on cached features: a batch of rows -> every
    head type's loss; at each epoch end every exit's val macro-F1 and each head type's
    best heads so far."""

    def __init__(self, feats, labels, blocks: list[int], device: torch.device):
        super().__init__(labels["val"])
        self.x = {k: torch.from_numpy(v) for k, v in feats["train"].items()}
        self.y = torch.from_numpy(labels["train"]).long()
        self.val, self.blocks, self.device = feats["val"], blocks, device

    def step(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        idx = torch.from_numpy(batch.rows)
        pooled = [self.x[f"block_{d}"][idx].to(self.device) for d in self.blocks]
        final, y = self.x["final"][idx].to(self.device), self.y[idx].to(self.device)
        losses = model(pooled, final, y)
        return sum(losses.values()), {h: float(v.detach()) for h, v in losses.items()}

    def evaluate(self, model: nn.ModuleDict, end: EpochEnd) -> dict:
        """Score every exit on val, keep each head type's best heads."""
        model.eval()
        val = {h: _logits(heads, self.blocks, self.val) for h, heads in model.items()}
        return self.scored_row(end, val, lambda h: model[h].state_dict())


def train_pooled_heads(
    models: dict[str, EarlyExitModel],
    cfg: ExitsRunConfig,
    feats: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    loss_cfg,
    accelerator,
    run_dir: Path,
    progress: bool = True,
    resume: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Train every model's heads on the cached features in place (best val epoch restored).

    Checkpoints go to ``run_dir/checkpoints`` (``fit``'s rule); ``resume`` continues from
    the latest one. Returns (history: a row per epoch with each head type's train loss and
    val macro-F1 per exit, best epoch per head type).
    """
    y_train = torch.from_numpy(labels["train"]).long()
    n_classes = feats["train"]["final"].shape[1]
    counts = torch.bincount(y_train, minlength=n_classes)
    hard = ClassificationLoss.from_config(loss_cfg, counts).to(accelerator.device)
    kd = KDLoss(cfg.exits.distill_alpha, cfg.exits.distill_temperature, hard_loss=hard)
    weights = sampling_weights(y_train, loss_cfg.sampler, n_classes)
    rows = Rows(np.arange(len(y_train)), weights=None if weights is None else weights.numpy())
    blocks = list(next(iter(models.values())).exit_blocks)
    method = CachedHeadTraining(feats, labels, blocks, accelerator.device)
    history, best_epoch = fit_exit_heads(
        method, PooledHeads(models, kd), rows, cfg, run_dir, accelerator, resume, progress
    )
    for h, m in models.items():
        m.heads.load_state_dict(method.best[h])
        m.heads.cpu().eval()
        log.info(
            "%s: best epoch %d, val macro-F1 per exit %s",
            h,
            best_epoch[h],
            [round(s, 4) for s in history[best_epoch[h]][h]["val_macro_f1"]],
        )
    return history, best_epoch


def run_cached_exits_train(
    cfg: ExitsRunConfig, progress: bool = True, resume: bool = False
) -> Path:
    """``dermkit exits train`` with ``exits.features=cached``; returns the exit-run folder.

    ``resume``: continue the heads' training from ``out_dir/checkpoints`` (the features
    are reused from the folder).
    """
    accelerator = make_accelerator(cfg.optim.precision)
    if accelerator.num_processes > 1:  # each would compute and write the features again
        raise ConfigError("exits.features=cached runs in one process (an epoch takes milliseconds)")
    base_dir = Path(cfg.base_run)
    backbone, base_cfg, classes = load_run_model(base_dir, purpose="early exits")
    torch.manual_seed(cfg.seed)
    try:
        models = {
            h: EarlyExitModel(backbone, cfg.exits.exit_blocks, h, len(classes), head_kwargs(cfg))
            for h in cfg.exits.head_types
        }
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{base_dir}: {err}") from err
    backbone.requires_grad_(False)
    _check(models, cfg)
    with RunDir(cfg.out_dir, cfg, "exits") as run:
        data = base_data(base_dir, base_cfg, cfg.data_path, cfg.cache_dir)
        check_classes(data, classes, base_dir)
        ds = {s: CachedImageDataset(data.cache, data.part(s), data.classes) for s in SPLITS}
        labels = {s: ds[s].labels.numpy() for s in SPLITS}
        feats = cached_features(run.path, next(iter(models.values())), ds)
        loss_cfg = cfg.loss or base_cfg.loss
        history, best_epoch = train_pooled_heads(
            models, cfg, feats, labels, loss_cfg, accelerator, run.path, progress, resume
        )
        logits = {
            s: {h: exit_logits(m, feats[s]) for h, m in models.items()} for s in ("val", "test")
        }
        write_exit_run(
            run.path, cfg, base_dir, base_cfg, classes, models, logits, labels, history, best_epoch
        )
        return run.path
