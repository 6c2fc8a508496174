"""`ctan train`: one architecture, one dataset, one seed (one task for STL).

Read top to bottom: set-up, resume, the epoch loop (train, validate, keep the best, checkpoint), and the
artefacts a later stage needs. Best epoch: the same rule for STL and multi-task models, on validation
metrics (`ctan.training.selection`); the test split is never looked at here.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ctan.config import dataset_settings, params_hash
from ctan.device import pick_device
from ctan.errors import CtanError
from ctan.layout import check_task_option, model_dir, per_task
from ctan.loader import prefetched
from ctan.manifest import read_manifest
from ctan.tasks import Task, dataset_tasks
from ctan.training import checkpoint
from ctan.training.losses import task_loss
from ctan.training.selection import classification_metrics, improves, selection_score
from ctan.training.weighting import build_weighting
from ctan.workspace import exclusive, sweep_temporaries


class NonFiniteLoss(CtanError):
    """The training loss (or the weights) became non-finite: no model is written.

    A subclass so that `ctan tune` can score a diverging grid point as a failure instead of aborting."""

    def __init__(self, path: str | Path | None, epoch: int, step: int | None, what: str) -> None:
        self.epoch, self.step, self.what = epoch, step, what
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        super().__init__(
            path,
            f"training diverged at {where}: {what}; no model written; lower training.lr "
            "(or use another weighting) and train again",
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def monitor_metrics(task: Task, prediction: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cheap per-batch metrics for learning curves (the exact metrics are `ctan evaluate`'s job)."""
    target = batch[task.name]
    if task.kind == "regression":
        mask = batch.get("possible_dose_mask")
        mask = torch.ones_like(target) if mask is None else mask.expand_as(target).float()
        return {"mae": float(((prediction - target).abs() * mask).sum() / mask.sum().clamp_min(1))}
    if task.kind == "segmentation":
        pred = (prediction > 0).float()
        dims = tuple(range(2, pred.ndim))
        inter, denom = (pred * target).sum(dims), (pred + target).sum(dims)
        dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-6), torch.ones_like(denom))
        return {"dice": float(dice.mean())}
    if task.out_channels == 1:
        correct = ((prediction.squeeze(1) > 0).long() == target.long()).float()
    else:
        correct = (prediction.argmax(1) == target.long()).float()
    return {"accuracy": float(correct.mean())}


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, else the process's peak resident set (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast: ``auto`` on CUDA only, ``bf16`` on CUDA and the CPU, ``fp32`` never."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type in ("cpu", "cuda"))


def memory_format(channels_last: bool, spatial_dims: int) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def _check_cpu_bf16(device: torch.device, precision: str) -> None:
    if precision != "bf16" or device.type != "cpu":
        return
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = True
    if not native:
        print(
            "warning: precision bf16 on a CPU without native bf16 instructions (AVX-512 BF16 / AMX) is "
            "several times slower than fp32"
        )


def run_epoch(
    model,
    weighting,
    tasks,
    loader,
    device,
    optimizer=None,
    desc: str = "",
    precision: str = "auto",
    layout: torch.memory_format = torch.contiguous_format,
    epoch: int = 0,
    patch_size: list[int] | None = None,
) -> dict[str, Any]:
    """One pass over a loader; trains when an optimizer is given. Returns mean losses and metrics.
    ``precision`` chooses autocast (`_autocast`), ``layout`` the memory format of the images.
    Without an optimizer, volumes larger than the training ``patch_size`` are predicted by sliding
    windows, as `ctan evaluate` predicts them (`ctan.inference`). A non-finite training loss raises
    `NonFiniteLoss` (naming ``epoch`` and the step) before the step is taken."""
    from ctan.inference import predict_volume

    training = optimizer is not None
    model.train(training)
    sums: dict[str, float] = {t.name: 0.0 for t in tasks}
    metric_sums: dict[str, dict[str, float]] = {t.name: {} for t in tasks}
    image_level: dict[str, list[tuple[np.ndarray, ...]]] = {t.name: [] for t in tasks if not t.dense}
    n_batches, wait, start = 0, 0.0, time.perf_counter()
    batches = prefetched(loader)  # the next batches are built while the model trains on this one
    bar = tqdm(batches, total=len(loader), desc=desc, leave=False, disable=None)
    it = iter(bar)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            batch = to_device(batch, device)
            batch["image"] = batch["image"].contiguous(memory_format=layout)
            with torch.set_grad_enabled(training), _autocast(device, precision):
                outputs = (
                    model(batch["image"]) if training else predict_volume(model, batch["image"], patch_size)
                )
                losses = {t.name: task_loss(t, outputs[t.name].float(), batch) for t in tasks}
            if training:
                total = weighting(losses)
                if not torch.isfinite(total.detach()):
                    bad = [
                        f"{t} {float(v.detach())}"
                        for t, v in losses.items()
                        if not torch.isfinite(v.detach())
                    ]
                    raise NonFiniteLoss(
                        None,
                        epoch,
                        n_batches + 1,
                        f"the training loss is {float(total.detach())}"
                        + (f" ({', '.join(bad)})" if bad else ""),
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
            for t in tasks:
                sums[t.name] += float(losses[t.name].detach())
                for k, v in monitor_metrics(t, outputs[t.name].detach().float(), batch).items():
                    metric_sums[t.name][k] = metric_sums[t.name].get(k, 0.0) + v
                if t.name in image_level and not training:
                    image_level[t.name].append(
                        (outputs[t.name].detach().float().cpu().numpy(), batch[t.name].cpu().numpy())
                        + ((batch["covid"].cpu().numpy(),) if "covid" in batch else ())
                    )
            n_batches += 1
            bar.set_postfix({t: f"{sums[t] / n_batches:.3f}" for t in sums})
    finally:
        batches.close()  # stops the thread at once if the loop ended early
    if n_batches == 0:
        raise CtanError(None, "no batches: the split is empty")
    elapsed = time.perf_counter() - start
    losses_mean = {t: s / n_batches for t, s in sums.items()}
    losses_mean["total"] = sum(losses_mean.values())
    metrics_mean = {t: {k: v / n_batches for k, v in m.items()} for t, m in metric_sums.items()}
    for t in tasks:
        if image_level.get(t.name):  # AUC / balanced accuracy need the whole split, not batch means
            parts = list(zip(*image_level[t.name], strict=True))
            logits = np.concatenate(parts[0])
            labels = np.concatenate([y.reshape(-1) for y in parts[1]])
            covid = np.concatenate([c.reshape(-1) for c in parts[2]]) if len(parts) > 2 else None
            metrics_mean[t.name].update(classification_metrics(t, logits, labels, covid))
    return {
        "loss": losses_mean,
        "metrics": metrics_mean,
        "seconds": elapsed,
        "steps": n_batches,
        "data_wait_fraction": wait / elapsed if elapsed > 0 else 0.0,
    }


def train(
    params: dict[str, Any],
    dataset: str,
    arch: str,
    seed: int,
    task: str | None = None,
    device: str | None = None,
    out: Path | None = None,
    tuned: bool = True,
) -> list[Path]:
    """Train and return the model folder(s). STL without --task trains each task in turn.

    ``tuned``: apply the tuning choice (`ctan.training.tuning`); ``out``: a folder other than the
    model's own (the tuning runs)."""
    from ctan import tracking

    settings = dataset_settings(params, dataset).trainable()
    if per_task(arch) and task is None:
        return [p for t in settings.tasks for p in train(params, dataset, arch, seed, t, device, out, tuned)]
    check_task_option(arch, task, dataset)
    manifest = read_manifest(settings.preprocessed_dir)
    tasks = dataset_tasks(settings, manifest, only=task)
    cfg = training_values(settings, arch, task, tuned)
    out = Path(out) if out is not None else model_dir(settings, arch, seed, task)
    out.mkdir(parents=True, exist_ok=True)
    # One writer per model folder: the same job started twice (Snakemake and `dvc repro`, two Snakemake
    # runs) would resume and rewrite the same checkpoint and model.
    with exclusive(out, "ctan train"):
        sweep_temporaries(out)  # a killed run's half-written checkpoint or model (the lock keeps it safe)
        dev = pick_device(device)
        identity = run_identity(settings, manifest, arch, seed, tasks, cfg)
        config_hash = params_hash(identity)
        code_hash = checkpoint.code_hash()

        seed_everything(seed)
        train_set, val_set = splits(settings, manifest, tasks, cfg, seed)
        seed_everything(seed)
        model, model_config = model_for(arch, tasks, settings, manifest, int(train_set[0]["image"].shape[0]))
        layout = memory_format(cfg.get("channels_last", False), model_config["spatial_dims"])
        model = model.to(dev).to(memory_format=layout)
        precision = cfg.get("precision", "auto")
        _check_cpu_bf16(dev, precision)
        state = fresh_state(model, tasks, cfg, dev)
        fixed_shape = (manifest.get("plan") or {}).get("shape") is not None
        train_loader, val_loader = loaders(train_set, val_set, cfg, seed, fixed_shape)
        ckpt_path = out / "checkpoint.pt"
        if said := state.resume(ckpt_path, config_hash, code_hash, cfg["epochs"]):
            print(said)

        label = tracking.run_name(dataset, arch, seed, task, tuning=not tuned)
        tags = {
            **run_tags(dataset, arch, seed, task),
            "data_hash": manifest["data_hash"],
            "config_hash": config_hash,
        }
        with tracking.training_run(params, label, tags, run_id=state.run_id) as run:
            state.run_id = run.info.run_id
            if state.epoch == 0:
                tracking.log_params(
                    {
                        **{f"training.{k}": v for k, v in cfg.items()},
                        **{f"model.{k}": v for k, v in model_config.items()},
                        "tasks": ",".join(t.name for t in tasks),
                    }
                )
            bar = tqdm(
                range(state.epoch + 1, cfg["epochs"] + 1),
                desc=label,
                initial=state.epoch,
                total=cfg["epochs"],
                disable=None,
            )
            for epoch in bar:
                try:
                    record = train_one_epoch(
                        state, tasks, train_loader, val_loader, epoch, dev, precision, layout
                    )
                except NonFiniteLoss as err:  # named by the model folder, which gets no model.pt
                    raise NonFiniteLoss(out, err.epoch, err.step, err.what) from None
                best = state.history[state.best_epoch - 1] if state.best_epoch else None
                state.add(record, better=best is not None and improves(record, best))
                tracking.log_metrics(_flatten_record(record), step=epoch)
                bar.set_postfix(
                    train=f"{record['train_loss']['total']:.3f}",
                    val=f"{record['val_loss']['total']:.3f}",
                    best=state.best_epoch,
                )
                # A batch log (Snakemake, SLURM): no progress bar, one line an epoch.
                if not sys.stderr.isatty():
                    print(_epoch_line(record, cfg["epochs"], state.best_epoch), file=sys.stderr, flush=True)
                state.save(ckpt_path, config_hash, code_hash)
            write_model(out, dev, state, model_config, tasks, config_hash, identity, params)
    return [out]


def store_intensity(store_dir: Path, split: str = "train") -> dict[str, Any]:
    """The intensity mapping the loader applies to a split (the CT window, or the RGB scale), from the
    store's attributes: the arrays keep HU, so the manifest's data_hash does not see it."""
    from ctan.store import SplitStore

    path = Path(store_dir) / f"{split}.zarr"
    try:
        return json.loads(json.dumps(SplitStore.open(path).attrs.get("intensity") or {}))
    except CtanError:
        raise
    except Exception as err:
        raise CtanError(
            path, f"unreadable split store ({type(err).__name__}); re-run `ctan preprocess`"
        ) from None


def run_identity(
    settings, manifest: dict[str, Any], arch: str, seed: int, tasks: list[Task], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Everything a trained model is the product of, as plain JSON values: its ``config_hash`` is the
    hash of this. A checkpoint resumes only the same identity, and `ctan evaluate` refuses a model
    whose recorded identity differs from the one the current params and data give."""
    identity = {
        "dataset": settings.name,
        "arch": arch,
        "seed": seed,
        "tasks": [t.to_dict() for t in tasks],
        "training": cfg,
        "model": settings.model,
        "data_hash": manifest["data_hash"],
        "intensity": store_intensity(settings.preprocessed_dir),
    }
    return json.loads(json.dumps(identity))


def identity_differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: recorded -> current`` for each leaf where two identities differ."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(recorded) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in recorded:
                out.append(f"{name}: (none) -> {current[key]!r}")
            elif key not in current:
                out.append(f"{name}: {recorded[key]!r} -> (none)")
            else:
                out.extend(identity_differences(recorded[key], current[key], name))
        return out
    return [] if recorded == current else [f"{prefix or 'value'}: {recorded!r} -> {current!r}"]


def training_values(
    settings, arch: str, task: str | None, tuned: bool, same_code: bool = True
) -> dict[str, Any]:
    """The dataset's training settings, with the tuning choice applied where there is one
    (``same_code``: `ctan.training.tuning.tuned_values`)."""
    if not tuned:
        return settings.training
    from ctan.training.tuning import tuned_values

    return {**settings.training, **tuned_values(settings, arch, task, same_code)}


def splits(settings, manifest: dict[str, Any], tasks: list[Task], cfg: dict[str, Any], seed: int):
    """The training split (patches and augmentation as configured) and the whole validation split."""
    from ctan.loader import CaseDataset

    patch = cfg["patch_size"] if manifest["spatial_dims"] == 3 else None
    cache = cfg.get("cache_mb", 0)
    store = settings.preprocessed_dir
    train_set = CaseDataset(
        store, "train", tasks, patch_size=patch, augment=cfg["augment"], seed=seed, cache_mb=cache
    )
    val_set = CaseDataset(
        store, "validation", tasks, patch_size=None, augment=False, seed=seed, cache_mb=cache
    )
    return train_set, val_set


def loaders(
    train_set, val_set, cfg: dict[str, Any], seed: int, fixed_shape: bool = True
) -> tuple[DataLoader, DataLoader]:
    """One DataLoader per split for the whole run, drawing ``(epoch, index)`` keys from an
    `EpochSampler`: with ``num_workers`` > 0 the workers persist across epochs, keeping their decoded
    cases, and build the next batches while the model trains on this one. Without a ``fixed_shape``
    (a native grid) whole validation volumes differ in size: they are validated one at a time."""
    from ctan.loader import EpochSampler, stack_items

    workers = int(cfg["num_workers"])

    def loader(split, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            split,
            batch_size=batch_size,
            sampler=EpochSampler(len(split), seed, shuffle),
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),  # workers' seeds: not from the global RNG
            collate_fn=stack_items,
        )

    val_batch = cfg["batch_size"] if fixed_shape else 1
    return loader(train_set, True, cfg["batch_size"]), loader(val_set, False, val_batch)


def model_for(arch: str, tasks: list[Task], settings, manifest: dict[str, Any], in_channels: int):
    """The model and the configuration `ctan evaluate` rebuilds it from."""
    from ctan.models import build_model

    config = {
        "arch": arch,
        "in_channels": in_channels,
        "spatial_dims": int(manifest["spatial_dims"]),
        **{k: settings.model[k] for k in ("width", "depth", "attention_heads")},
    }
    return build_model(tasks=tasks, **config), config


def fresh_state(model, tasks: list[Task], cfg: dict[str, Any], dev: torch.device) -> checkpoint.TrainingState:
    """Model, loss weighting, optimiser and learning-rate schedule at epoch 0."""
    weighting = build_weighting(cfg["weighting"], [t.name for t in tasks], cfg["dwa_temperature"]).to(dev)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg["optimizer"]]
    optimizer = opt_cls(
        list(model.parameters()) + list(weighting.parameters()),
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
    )
    schedule = cfg["schedule"]
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=schedule["step_size"], gamma=schedule["gamma"]
    )
    return checkpoint.TrainingState(model, weighting, optimizer, scheduler)


def run_tags(dataset: str, arch: str, seed: int, task: str | None) -> dict[str, str]:
    from ctan.provenance import code_version

    commit, dirty = code_version()
    return {
        "dataset": dataset,
        "architecture": arch,
        "seed": str(seed),
        "task": task or "all",
        "git_commit": commit,
        "git_dirty": str(dirty),
    }


def train_one_epoch(
    state: checkpoint.TrainingState,
    tasks: list[Task],
    train_loader: DataLoader,
    val_loader: DataLoader,
    epoch: int,
    dev: torch.device,
    precision: str,
    layout: torch.memory_format,
) -> dict[str, Any]:
    """Train one pass (shuffled by seed and epoch alone, so a resumed run sees the same order),
    validate, step the schedule; the epoch's record for history.json."""
    model, weighting, optimizer = state.model, state.weighting, state.optimizer
    train_loader.sampler.set_epoch(epoch)
    tr = run_epoch(
        model,
        weighting,
        tasks,
        train_loader,
        dev,
        optimizer,
        f"epoch {epoch} train",
        precision,
        layout,
        epoch,
    )
    # The last step's update can make the weights non-finite with a finite loss (one step an epoch).
    if not all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters()):
        raise NonFiniteLoss(None, epoch, None, "the weights became non-finite after the last step")
    weighting.end_epoch({t.name: tr["loss"][t.name] for t in tasks})
    patch = getattr(train_loader.dataset, "patch_size", None)  # what the network was trained on
    va = run_epoch(
        model, weighting, tasks, val_loader, dev, None, f"epoch {epoch} val", precision, layout, epoch, patch
    )
    state.scheduler.step()
    first = state.history[0]["val_metrics"] if state.history else va["metrics"]
    return {
        "epoch": epoch,
        "train_loss": tr["loss"],
        "val_loss": va["loss"],
        "train_metrics": tr["metrics"],
        "val_metrics": va["metrics"],
        "weights": weighting.weights(),
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": tr["seconds"] + va["seconds"],
        "step_seconds": tr["seconds"] / tr["steps"],
        "data_wait_fraction": tr["data_wait_fraction"],
        "peak_memory_mib": peak_memory_mib(dev),
        "selection_score": selection_score(tasks, va["metrics"], first),
    }


def write_model(
    out: Path,
    dev: torch.device,
    state: checkpoint.TrainingState,
    model_config: dict[str, Any],
    tasks: list[Task],
    config_hash: str,
    identity: dict[str, Any],
    params: dict[str, Any],
) -> None:
    """What later stages read: history.json, run.json (the MLflow run), the learning curves, also logged
    to MLflow, and last the kept epoch's weights (model.pt + its SHA-256)."""
    from ctan import tracking
    from ctan.provenance import machine

    # model.pt is the mark of a finished folder (Snakemake and DVC key on it), so it is written last, and
    # an earlier run's is removed first: a run killed in here leaves no model.pt beside another run.json.
    model_path = out / "model.pt"
    model_path.unlink(missing_ok=True)
    checkpoint.digest_path(model_path).unlink(missing_ok=True)
    history = {"epochs": state.history, "best_epoch": state.best_epoch, "machine": machine(str(dev))}
    (out / "history.json").write_text(json.dumps(history, indent=1))
    (out / "run.json").write_text(
        json.dumps({"run_id": state.run_id, "tracking_uri": tracking.tracking_uri(params)}, indent=1)
    )
    try:
        from ctan.plots import plot_learning_curves

        plot_learning_curves(history, out / "curves.png")
        tracking.log_artifact(str(out / "curves.png"))
    except ImportError:
        pass
    tracking.log_metrics({"best_epoch": state.best_epoch, "best_selection_score": state.best_score})
    final = {
        "model_config": model_config,
        "tasks": [t.to_dict() for t in tasks],
        "state_dict": state.best_model,
        "best_epoch": state.best_epoch,
        "config_hash": config_hash,
        "data_hash": identity["data_hash"],
        "identity": identity,  # what config_hash is the hash of: `ctan evaluate` names what differs
    }
    checkpoint.save_model(final, model_path)
    tracking.log_artifact(str(model_path), artifact_path="model")


def _epoch_line(record: dict[str, Any], epochs: int, best_epoch: int) -> str:
    """One log line per epoch: losses (total, then per task), validation metrics, time, memory."""

    def losses(split: str) -> str:
        parts = record[f"{split}_loss"]
        tasks = " ".join(f"{t} {v:.4f}" for t, v in parts.items() if t != "total")
        return f"{parts['total']:.4f} ({tasks})"

    metrics = " ".join(f"{t}/{k} {v:.4f}" for t, m in record["val_metrics"].items() for k, v in m.items())
    return (
        f"epoch {record['epoch']}/{epochs} train loss {losses('train')} val loss {losses('val')} "
        f"val {metrics} | step {record['step_seconds']:.3f} s, epoch {record['seconds']:.1f} s, "
        f"data wait {record['data_wait_fraction']:.0%}, peak {record['peak_memory_mib']:.0f} MiB, "
        f"lr {record['lr']:.3g}, best epoch {best_epoch}"
    )


def _flatten_record(record: dict[str, Any]) -> dict[str, float]:
    flat = {f"train_loss/{k}": v for k, v in record["train_loss"].items()}
    flat.update({f"val_loss/{k}": v for k, v in record["val_loss"].items()})
    for t, m in record["val_metrics"].items():
        flat.update({f"val/{t}/{k}": v for k, v in m.items()})
    flat.update({f"weight/{k}": v for k, v in record["weights"].items()})
    flat["data_wait_fraction"] = record["data_wait_fraction"]
    flat["epoch_seconds"] = record["seconds"]
    for key in ("step_seconds", "peak_memory_mib"):
        if key in record:
            flat[key] = record[key]
    return flat
