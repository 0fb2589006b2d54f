"""One trial: one configuration trained, selected on validation, and scored — no Ray needed.

``run_trial(config, out_dir, callback=...)`` reads top to bottom in phases (nanoGPT style):

1. output folder   — refuse to overwrite a different trial
2. data            — index → split manifest → image cache (all shared with every other trial)
3. model           — backbone from the registry + head; frozen for ``linear_probe``
4. probe features  — linear probe only: embeddings from the embedding cache (computed once)
5. training        — per epoch: train, evaluate on val, hand the metrics to ``callback``, keep the best
6. final scoring   — the selected epoch's model scores val and test, once (with ``tta``, if set)
7. artefacts       — ``predictions.parquet``, ``checkpoint.safetensors``, ``model.json``, ``summary.json``

The sweep layer wraps this function; ``callback(metrics)`` is its hook (it may raise to stop a trial).
A NaN/inf loss ends the trial with status ``diverged`` — recorded, not a crash; a sweep's spent time budget
ends it with status ``out_of_budget``.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import skinsweep
from skinsweep.errors import ConfigError, DataError, first_line
from skinsweep.train.config import TrialConfig

PREDICTIONS = "predictions.parquet"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
MODEL_JSON = "model.json"


@dataclass
class TrialResult:
    trial_id: str
    status: str                 # completed | diverged | out_of_budget
    out_dir: Path
    best_epoch: int | None
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------

def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier on the base lr at ``step``: linear warmup, then constant or cosine to 0; or onecycle.

    ``onecycle`` is ``torch.optim.lr_scheduler.OneCycleLR`` with its defaults (div_factor 25,
    final_div_factor 1e4, cosine annealing, two phases), ``pct_start`` = the warm-up's share of the steps
    (0.3 without one): a pure function of the step, so it needs no scheduler state to checkpoint.
    """
    if schedule == "onecycle":
        up = (warmup_steps if warmup_steps else 0.3 * total_steps) - 1  # OneCycleLR's end of phase one
        start, end = (1 / 25, 1.0) if step <= up else (1.0, 1 / 25 / 1e4)
        if step <= up:
            pct = step / up if up > 0 else 1.0
        else:
            pct = (step - up) / max(total_steps - 1 - up, 1e-12)
        return end + (start - end) / 2 * (math.cos(math.pi * min(1.0, pct)) + 1)
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def loss_fn(logits: torch.Tensor, y: torch.Tensor, cfg: TrialConfig, smoothing: float | None = None) -> torch.Tensor:
    """Weighted BCE (pos_weight), or sigmoid focal loss with alpha = w / (1 + w) for the same balance.

    Targets are smoothed to ``y(1-ε)+ε/2`` with ε = ``smoothing`` (default ``cfg.label_smoothing``); the
    reported val/test losses pass 0, so they stay comparable across ε.
    """
    eps = cfg.label_smoothing if smoothing is None else smoothing
    if eps:
        y = y * (1 - eps) + eps / 2
    if cfg.loss == "focal":
        from torchvision.ops import sigmoid_focal_loss

        alpha = cfg.pos_weight / (1 + cfg.pos_weight)
        return sigmoid_focal_loss(logits, y, alpha=alpha, gamma=cfg.focal_gamma, reduction="mean")
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(cfg.pos_weight, device=y.device))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is visible; use --device cpu")
    return dev


def versions() -> dict[str, str]:
    import open_clip
    import timm

    return {"skinsweep": skinsweep.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "open_clip": open_clip.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------------

def run_trial(
    config: TrialConfig,
    out_dir: str | Path,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    trial_id: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    extra_columns: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> TrialResult:
    """Train and evaluate one configuration; write its artefacts to ``out_dir``.

    Args:
        config: the trial settings.
        out_dir: folder for predictions, checkpoint and summary (created; must not hold another trial).
        callback: called after every epoch with ``{"epoch", "train_loss", "val_loss", "val_auc", ...}``.
        trial_id: id recorded in every row (default ``<backbone>-<mode>-<config hash>``).
        progress: show a progress bar.
        overwrite: replace the artefacts of a different trial in ``out_dir``.
        extra_columns: constant columns added to every prediction row (e.g. the sweep's recipe hash).
        deadline: ``time.time()`` at which a sweep's time budget runs out. Training stops at the first batch
            after it; the trial ends with status ``out_of_budget``, its val metrics those of its best epoch so
            far, and no predictions or checkpoint (it did not finish, so no test score and no ensemble member).
    """
    from skinsweep.train.backbones import create_backbone
    from skinsweep.data.cache import build_cache
    from skinsweep.data.index import load_index
    from skinsweep.data.split import get_or_create_split
    from skinsweep.data.transforms import eval_transform, train_transform, tta_logits
    from skinsweep.train.embeddings import cached_embeddings, embedding_key
    from skinsweep.metrics import HIGHER_IS_BETTER, binary_metrics, sigmoid
    from skinsweep.train.model import Classifier, count_parameters, make_head, param_groups
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.perf_counter()
    cfg = config
    trial_id = trial_id or f"{cfg.backbone}-{cfg.mode}-{cfg.hash[:8]}"
    out = Path(out_dir)

    # ---- 1. output folder ---------------------------------------------------------------------
    existing = out / SUMMARY
    if existing.is_file() and not overwrite:
        old = json.loads(existing.read_text())
        # path_hash: what folders written before the split counted by content recorded
        if old.get("config_hash") in (cfg.hash, cfg.path_hash) and old.get("status") in ("completed", "diverged"):
            return _result_from_summary(old, out)  # the same trial already ran: reuse, don't retrain
        raise ConfigError(f"{out} already holds a different trial ({old.get('trial_id')}, config "
                          f"{old.get('config_hash')}); choose another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror}; choose another --out") from None

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    if deadline is not None and time.time() >= deadline:  # started after the sweep's budget ran out
        return _out_of_budget_before_start(cfg, trial_id, out, t0)

    # ---- 2. data ------------------------------------------------------------------------------
    index = load_index(cfg.data, positive=cfg.positive, skip_bad=cfg.skip_bad, progress=progress)
    manifest, split_path, _ = get_or_create_split(index, split_path=cfg.split, seed=cfg.split_seed)
    backbone = create_backbone(cfg.backbone, weights=cfg.weights, **cfg.backbone_args)  # after the cheap data checks
    size = cfg.image_size or backbone.data_config.input_size
    cache = build_cache(index, size=size, policy=cfg.resize_policy, progress=progress)
    ids = {s: manifest.ids(s) for s in ("train", "val", "test")}
    if not ids["train"] or not ids["val"]:
        raise DataError(f"split {split_path} has no {'train' if not ids['train'] else 'val'} images; "
                        "re-create it with larger fractions")
    rows = {s: cache.rows(v) for s, v in ids.items()}
    labels = manifest.df.set_index("image_id")["label"]
    y = {s: labels.loc[v].to_numpy(dtype=np.float32) for s, v in ids.items()}
    if y["train"].sum() == 0:
        raise DataError(f"split {split_path}: the train split has no positive images; use another seed or split")

    # ---- 3. model -----------------------------------------------------------------------------
    head_kind = backbone.default_head if cfg.head == "auto" else cfg.head
    torch.manual_seed(cfg.seed)
    head = make_head(head_kind, backbone.num_features, hidden=cfg.head_hidden, dropout=cfg.dropout)
    model = Classifier(backbone.model, head, mode=cfg.mode).to(device)
    cuda = device.type == "cuda"
    if cuda and backbone.family == "cnn":
        model = model.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    augment = cfg.augment
    if augment == "auto":  # the study augmented ResNet-18 only; a frozen probe gains nothing from it
        augment = "resnet_study" if backbone.family == "cnn" and cfg.mode == "finetune" else "none"
    t_train = train_transform(backbone.data_config, augment).to(device)
    t_eval = eval_transform(backbone.data_config).to(device)

    def layout(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if cuda and backbone.family == "cnn" else x

    def to_input(batch: np.ndarray, transform, g=None) -> torch.Tensor:
        return layout(transform(torch.from_numpy(np.asarray(batch)).to(device, non_blocking=True), g))

    # ---- 4. probe features (linear probe only) ------------------------------------------------
    feats: dict[str, torch.Tensor] = {}
    embedding_cache = None
    probe_on_feats = cfg.mode == "linear_probe" and cfg.embedding_cache
    if probe_on_feats:
        key = embedding_key(backbone_spec=backbone.spec(), data_config=backbone.data_config.to_dict(),
                            image_cache_key=cache.key, split_hash=manifest.hash, seed=cfg.seed)

        @torch.no_grad()
        def embed(batch: torch.Tensor) -> torch.Tensor:
            model.backbone.eval()
            with autocast():
                return model.features(to_input(batch, t_eval))

        all_ids = ids["train"] + ids["val"] + ids["test"]
        arr, hit = cached_embeddings(key, all_ids, cache, embed, batch_size=cfg.eval_batch_size)
        embedding_cache = "hit" if hit else "miss"
        parts = np.split(arr, np.cumsum([len(ids["train"]), len(ids["val"])]))
        feats = {s: torch.from_numpy(np.array(p)).to(device) for s, p in zip(("train", "val", "test"), parts)}

    # ---- 5. training --------------------------------------------------------------------------
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay))
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = math.ceil(len(rows["train"]) / cfg.batch_size)
    total_steps, warmup_steps = steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs

    def forward(split: str, sel: np.ndarray, transform, g=None, tta: str = "none") -> torch.Tensor:
        """Logits of the ``split`` images at positions ``sel``: from probe features or from pixels
        (a cached probe's TTA views are new images: the frozen backbone embeds them, uncached)."""
        with autocast():
            if probe_on_feats and tta == "none":
                return model.head_forward(feats[split][torch.from_numpy(sel).to(device)])
            x = to_input(cache.images[rows[split][sel]], transform, g)
            return tta_logits(lambda v: model(layout(v)), x, tta)

    @torch.no_grad()
    def predict(split: str, tta: str = "none") -> np.ndarray:
        """Logits (N,) of ``split`` in manifest order, averaged over the ``tta`` views."""
        model.eval()
        n = len(rows[split])
        out_logits = [forward(split, np.arange(s, min(s + cfg.eval_batch_size, n)), t_eval, tta=tta).float().cpu()
                      for s in range(0, n, cfg.eval_batch_size)]
        return torch.cat(out_logits).numpy() if out_logits else np.zeros(0, np.float32)

    def split_loss(logits: np.ndarray, split: str) -> float:
        return float(loss_fn(torch.from_numpy(logits), torch.from_numpy(y[split]), cfg, smoothing=0.0))

    better = HIGHER_IS_BETTER[cfg.select_metric]
    best_epoch, best_score, best_state = None, None, None
    history: list[dict] = []
    status, step = "completed", 0
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), disable=not progress)
    with bar:
        bar_task = bar.add_task(f"{trial_id} epoch", total=cfg.epochs, info="")
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = rng.permutation(len(rows["train"]))
            losses = []
            for s in range(0, len(order), cfg.batch_size):
                if deadline is not None and time.time() >= deadline:
                    status = "out_of_budget"
                    break
                sel = np.sort(order[s:s + cfg.batch_size])  # sorted rows read the memmap sequentially
                for g, base in zip(opt.param_groups, base_lrs):
                    g["lr"] = base * lr_factor(step, total_steps, warmup_steps, cfg.schedule)
                yb = torch.from_numpy(y["train"][sel]).to(device)
                loss = loss_fn(forward("train", sel, t_train, gen).float(), yb, cfg)
                if not torch.isfinite(loss):
                    status = "diverged"
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
            if status != "completed":
                break
            val_logits = predict("val")  # no TTA: cheap epochs; only the selected epoch is scored with it
            m = binary_metrics(y["val"], sigmoid(val_logits).astype(np.float32), loss=split_loss(val_logits, "val"))
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                      **{f"val_{k}": v for k, v in m.items()}}
            history.append(record)
            score = m[cfg.select_metric]
            if best_score is None or (score > best_score if better else score < best_score) or (
                    isinstance(best_score, float) and math.isnan(best_score) and not math.isnan(score)):
                best_epoch, best_score = epoch, score
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            bar.update(bar_task, completed=epoch, info=f"loss {record['train_loss']:.4f}  "
                       f"val AUC {record['val_auc']:.4f}  best epoch {best_epoch}")
            if callback:
                callback(dict(record, best_epoch=best_epoch, trial_id=trial_id))

    # ---- 6. final scoring with the selected epoch ---------------------------------------------
    result_rows, val_metrics, test_metrics = [], {}, {}
    if status == "out_of_budget" and best_epoch is not None:  # stopped by the sweep's budget: no scoring
        val_metrics = {k.removeprefix("val_"): v for k, v in history[best_epoch - 1].items() if k.startswith("val_")}
    elif best_state is not None:
        model.load_state_dict(best_state)
        for split in ("val", "test"):
            if not len(rows[split]):
                continue
            logits = predict(split, tta=cfg.tta)
            prob = sigmoid(logits).astype(np.float32)
            mm = binary_metrics(y[split], prob, loss=split_loss(logits, split))
            (val_metrics if split == "val" else test_metrics).update(mm)
            part = manifest.df.set_index("image_id").loc[ids[split]].reset_index()
            result_rows.append(pd.DataFrame({
                "image_id": part["image_id"], "lesion_id": part["lesion_id"], "label": part["label"].astype("int8"),
                "dx": part["dx"], "logit": logits.astype("float32"), "prob": prob.astype("float32"),
                "split": split, "epoch": np.int32(best_epoch), "trial_id": trial_id, "backbone": cfg.backbone,
                "mode": cfg.mode, "split_hash": manifest.hash, "config_hash": cfg.hash, "tta_used": cfg.tta,
                **(extra_columns or {}),
            }))

    # ---- 7. artefacts -------------------------------------------------------------------------
    from safetensors.torch import save_model

    from skinsweep.files import atomic_path, atomic_write_text, json_safe

    if result_rows:
        with atomic_path(out / PREDICTIONS) as tmp:
            pd.concat(result_rows, ignore_index=True).to_parquet(tmp, index=False)
        with atomic_path(out / CHECKPOINT) as tmp:
            save_model(model.cpu(), str(tmp))
        atomic_write_text(out / MODEL_JSON, json.dumps({
            "backbone": backbone.spec(), "head": {"kind": head_kind, "hidden": cfg.head_hidden, "dropout": cfg.dropout},
            "mode": cfg.mode, "data_config": backbone.data_config.to_dict(), "image_size": size,
            "resize_policy": cfg.resize_policy, "tta": cfg.tta, "positive": list(index.positive), "trial_id": trial_id,
            "epoch": best_epoch, "split_hash": manifest.hash, "config_hash": cfg.hash, "versions": versions(),
        }, indent=2))
    summary = {
        "trial_id": trial_id, "status": status, "config": cfg.model_dump(), "config_hash": cfg.hash,
        "split": str(split_path), "split_hash": manifest.hash, "dataset_hash": index.hash,
        "select_metric": cfg.select_metric, "best_epoch": best_epoch, "epochs_run": len(history),
        "val": val_metrics, "test": test_metrics, "history": history, "runtime_s": time.perf_counter() - t0,
        "device": str(device), "augment": augment, "tta": cfg.tta, "head": head_kind, "embedding_cache": embedding_cache,
        "n_params": count_parameters(model), "n_trainable": count_parameters(model, trainable_only=True),
        "n_images": {s: len(v) for s, v in ids.items()}, "versions": versions(),
        "artefacts": {"predictions": PREDICTIONS, "checkpoint": CHECKPOINT, "model": MODEL_JSON} if result_rows else {},
    }
    atomic_write_text(out / SUMMARY, json.dumps(json_safe(summary), indent=2))
    return _result_from_summary(json.loads((out / SUMMARY).read_text()), out)


def _out_of_budget_before_start(cfg: TrialConfig, trial_id: str, out: Path, t0: float) -> TrialResult:
    """The summary of a trial that started after the sweep's time budget ran out: nothing trained."""
    from skinsweep.files import atomic_write_text, json_safe

    summary = {"trial_id": trial_id, "status": "out_of_budget", "config": cfg.model_dump(), "config_hash": cfg.hash,
               "select_metric": cfg.select_metric, "best_epoch": None, "epochs_run": 0, "val": {}, "test": {},
               "history": [], "runtime_s": time.perf_counter() - t0, "versions": versions(), "artefacts": {}}
    atomic_write_text(out / SUMMARY, json.dumps(json_safe(summary), indent=2))
    return _result_from_summary(summary, out)


def _result_from_summary(s: dict, out: Path) -> TrialResult:
    return TrialResult(trial_id=s["trial_id"], status=s["status"], out_dir=out, best_epoch=s["best_epoch"],
                       val=s["val"], test=s["test"], history=s["history"], summary=s)


# --------------------------------------------------------------------------------------------------
# Rebuilding a trained model
# --------------------------------------------------------------------------------------------------

def load_trial_model(out_dir: str | Path, device: str = "cpu"):
    """Rebuild a trial's selected model from ``model.json`` + ``checkpoint.safetensors``.

    Returns ``(model, meta)`` with ``model`` in eval mode; no pickle is involved.
    """
    from safetensors.torch import load_model

    from skinsweep.train.backbones import backbone_from_spec
    from skinsweep.train.model import Classifier, make_head

    out = Path(out_dir)
    if not (out / MODEL_JSON).is_file() or not (out / CHECKPOINT).is_file():
        raise DataError(f"{out} holds no trained model ({MODEL_JSON} + {CHECKPOINT}); run `skinsweep train` first")
    meta = json.loads((out / MODEL_JSON).read_text())
    backbone = backbone_from_spec(meta["backbone"], weights="none")  # weights come from the checkpoint
    h = meta["head"]
    model = Classifier(backbone.model, make_head(h["kind"], backbone.num_features, hidden=h["hidden"],
                                                 dropout=h["dropout"]), mode=meta["mode"])
    try:
        load_model(model, str(out / CHECKPOINT), device=device)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        reason = first_line(e)[:200]
        raise DataError(f"{out / CHECKPOINT} does not load into the model model.json describes ({reason}); "
                        "the file is damaged or from another trial — re-run the trial") from None
    return model.to(device).eval(), meta
