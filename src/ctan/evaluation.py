"""`ctan evaluate`: score trained models on the test split with the field's metrics.

Writes ``metrics.json`` (headline metrics per task, their direction, per-case values for paired
statistics, provenance), the predictions, and a figure of example predictions. OpenKBP dose predictions
are also written in the challenge's CSV format on the original 128³ grid and scored there, exactly as
the challenge does, whatever resolution training ran at.

A model is scored only if it is the one the current params train on the data the training dataset's
preprocessed folder holds now (`check_trained_on`), and only if it predicts finite values. The results
folder is written all or none: built beside it and swapped into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from ctan.config import dataset_settings
from ctan.device import pick_device
from ctan.errors import CtanError
from ctan.layout import choice_path, model_dir, networks, results_dir
from ctan.manifest import read_manifest
from ctan.provenance import code_version, file_sha256, machine
from ctan.results import strict_json
from ctan.tasks import Task, dataset_tasks
from ctan.training import checkpoint
from ctan.workspace import partial_folder

# Targets whose name marks them as dose targets in bring-your-own cases (DVH: D99, D95, D1).
TARGET_PREFIXES = ("PTV", "CTV", "GTV")


def load_models(
    settings, arch: str, seed: int, device: torch.device
) -> tuple[dict[str, torch.nn.Module], dict]:
    """{task name: model}; an MTL model serves all its tasks, STL has one model per task.

    Each model must be the one the current params train on the data ``settings``' preprocessed folder
    holds now (`check_trained_on`); for an external test set, ``settings`` is the training dataset's."""
    from ctan.models import build_model

    manifest = read_manifest(settings.preprocessed_dir)
    paths = model_paths(settings, arch, seed)
    models: dict[str, torch.nn.Module] = {}
    hashes = {}
    for network, path in paths.items():
        if not path.is_file():
            raise CtanError(
                path, f"missing; run `ctan train --dataset {settings.name} --arch {arch} --seed {seed}`"
            )
        checkpoint.verify(path)  # against the SHA-256 recorded at training time, before anything loads
        state = checkpoint.load(path)
        try:
            cfg = state["model_config"]
            tasks = [Task.from_dict(t) for t in state["tasks"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CtanError(path, f"not a ctan model file (no {err}); retrain it") from None
        # The hash file travels with a copied model, so only the model can say what it is: results
        # are filed under --arch, and a copied file would put another architecture's scores there.
        expected = [network] if network else list(settings.tasks)
        held = [t.name for t in tasks]
        if cfg.get("arch") != arch or held != expected:
            raise CtanError(
                path,
                f"holds a {cfg.get('arch')} model of {', '.join(held)}, not the {arch} model of "
                f"{', '.join(expected)} this run evaluates (copied from another run?); retrain it",
            )
        check_trained_on(path, state, settings, manifest, arch, seed, network)
        model = build_model(
            cfg["arch"],
            tasks,
            in_channels=cfg["in_channels"],
            spatial_dims=cfg["spatial_dims"],
            width=cfg["width"],
            depth=cfg["depth"],
            attention_heads=cfg["attention_heads"],
        )
        model.load_state_dict(state["state_dict"])
        model.to(device).eval()
        for t in tasks:
            models[t.name] = model
        hashes[str(path)] = file_sha256(path)
    return models, hashes


def model_paths(settings, arch: str, seed: int) -> dict[str | None, Path]:
    """{network: its model.pt}: one per task for STL, one (``None``) otherwise."""
    return {t: model_dir(settings, arch, seed, t) / "model.pt" for t in networks(arch, settings.tasks)}


def check_trained_on(
    path: Path, state: dict[str, Any], settings, manifest: dict[str, Any], arch: str, seed: int, network
) -> None:
    """Refuse a model trained on other data than ``settings``' preprocessed folder holds now (its
    ``data_hash``), or with other training or model settings, tasks or intensity mapping (CT window)
    than the current params and stores give (its ``config_hash`` against the one `ctan train` would
    compute now): scores filed under these params would not be this model's."""
    from ctan.config import params_hash
    from ctan.training.trainer import identity_differences, run_identity, training_values

    how = f"ctan train --dataset {settings.name} --arch {arch} --seed {seed}" + (
        f" --task {network}" if network else ""
    )
    recorded_data, data_now = state.get("data_hash"), manifest["data_hash"]
    if recorded_data != data_now:
        raise CtanError(
            path,
            f"trained on other data (data_hash {str(recorded_data)[:12]}) than {settings.preprocessed_dir} "
            f"holds now ({str(data_now)[:12]}); retrain it: `{how}`",
        )
    tasks = dataset_tasks(settings, manifest, only=network)
    cfg = training_values(settings, arch, network, True, same_code=False)
    current = run_identity(settings, manifest, arch, seed, tasks, cfg)
    expected = params_hash(current)
    if state.get("config_hash") == expected:
        return
    recorded = state.get("identity")
    diffs = identity_differences(recorded, current) if isinstance(recorded, dict) else []
    if diffs:
        what = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
    else:  # a model from before the record was kept (or an edited one): only the hashes to show
        recorded_hash = str(state.get("config_hash"))[:16]
        what = f"config_hash {recorded_hash} -> {expected}; no recorded settings to compare"
    raise CtanError(
        path,
        f"trained with other training/model settings than the current params and data give "
        f"(recorded -> now: {what}); retrain it: `{how}`",
    )


def check_finite(
    preds: dict[str, np.ndarray], paths: dict[str | None, Path], arch: str, case_id: str
) -> None:
    """Refuse a model that predicts NaN or infinity (a diverged training), naming its file."""
    from ctan.layout import per_task

    for task, pred in preds.items():
        if not np.isfinite(pred).all():
            path = paths[task if per_task(arch) else None]
            raise CtanError(
                path,
                f"predicts non-finite values ({task}, test case {case_id}): its training diverged; "
                "retrain it with a lower training.lr",
            )


def check_shapes(
    preds: dict[str, np.ndarray],
    item: dict[str, Any],
    tasks: list[Task],
    paths: dict[str | None, Path],
    arch: str,
    case_id: str,
) -> None:
    """Refuse a dense prediction that is not on its reference's grid, naming the model file: it would
    be scored against other voxels, or fail inside numpy with a traceback."""
    from ctan.layout import per_task

    for t in tasks:
        if not t.dense:
            continue
        got, want = tuple(preds[t.name].shape), tuple(item[t.name].shape)
        if got != want:
            raise CtanError(
                paths[t.name if per_task(arch) else None],
                f"predicts {t.name} of shape {got} for test case {case_id}, whose reference is {want}",
            )


@torch.no_grad()
def predict(
    models: dict[str, torch.nn.Module],
    tasks: list[Task],
    image: torch.Tensor,
    patch_size: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Probabilities for segmentation/classification, Gy for dose; one prediction per distinct model,
    by sliding windows of the training ``patch_size`` where the volume is larger (`ctan.inference`)."""
    from ctan.inference import predict_volume

    outputs: dict[str, torch.Tensor] = {}
    cache: dict[int, dict[str, torch.Tensor]] = {}
    for t in tasks:
        model = models[t.name]
        if id(model) not in cache:
            cache[id(model)] = predict_volume(model, image[None], patch_size)
        outputs[t.name] = cache[id(model)][t.name][0].float()
    preds = {}
    for t in tasks:
        out = outputs[t.name]
        if t.kind == "regression":
            preds[t.name] = out.clamp_min(0).cpu().numpy()
        elif t.kind == "segmentation" or t.out_channels == 1:
            preds[t.name] = torch.sigmoid(out).cpu().numpy()
        else:
            preds[t.name] = torch.softmax(out, dim=0).cpu().numpy()
    return preds


def to_source_grid(array: np.ndarray, attrs: dict[str, Any], order: int = 1) -> np.ndarray:
    """Map a (C, *spatial) array on the preprocessed grid back to the source grid through world coordinates.

    Preprocessing keeps the direction cosines, so the map between the two index spaces is a per-axis
    scale and shift: i_pre = (o_src − o_pre)·D / s_pre + (s_src / s_pre)·i_src.
    """
    sp, ss = np.asarray(attrs["spacing"], float), np.asarray(attrs["source_spacing"], float)
    op, os_ = (
        np.asarray(attrs["origin"] or np.zeros_like(sp), float),
        np.asarray(attrs["source_origin"] or np.zeros_like(sp), float),
    )
    d = np.asarray(attrs["direction"] or np.eye(len(sp)).ravel(), float).reshape(len(sp), len(sp))
    scale = ss / sp
    offset = (d.T @ (os_ - op)) / sp
    shape = tuple(int(s) for s in attrs["source_shape"])
    if np.allclose(scale, 1) and np.allclose(offset, 0) and tuple(array.shape[1:]) == shape:
        return array
    return np.stack(
        [
            ndimage.affine_transform(c, scale, offset=offset, output_shape=shape, order=order, mode="nearest")
            for c in array
        ]
    )


def evaluate(
    params: dict[str, Any],
    dataset: str,
    arch: str,
    seed: int,
    device: str | None = None,
    on: str | None = None,
) -> Path:
    """Score the models of ``dataset`` on its test split, or with ``on`` on every case of that external
    test set of it (results under ``results/<dataset>/external/<on>/``); return the metrics.json path."""
    settings = dataset_settings(params, dataset).trainable()
    data = external_test_set(params, settings, on) if on else settings  # the store evaluated
    manifest = read_manifest(data.preprocessed_dir)
    if on:
        check_external_manifest(read_manifest(settings.preprocessed_dir), manifest, settings, data)
        check_external_intensity(settings, data)
    tasks = dataset_tasks(settings, manifest)
    dev = pick_device(device)
    models, model_hashes = load_models(settings, arch, seed, dev)
    final = results_dir(data, arch, seed)
    # All or nothing: the results are built in a hidden sibling folder and swapped into place only when
    # complete, so a failure keeps the previous results and leaves no partial folder behind.
    with partial_folder(final) as work:
        out = work / final.name
        _evaluate_into(
            out, params, settings, data, manifest, tasks, arch, seed, dev, on, models, model_hashes
        )
        if final.exists():
            os.replace(final, work / "replaced")
        os.replace(out, final)
    return final / "metrics.json"


def _evaluate_into(
    out: Path, params, settings, data, manifest, tasks, arch, seed, dev, on, models, model_hashes
) -> None:
    """Everything `evaluate` writes, into the folder ``out`` (not yet in place)."""
    from ctan import metrics
    from ctan.loader import CaseDataset
    from ctan.store import SplitStore

    dataset = settings.name
    paths = model_paths(settings, arch, seed)
    pred_dir = out / "predictions"
    pred_dir.mkdir(parents=True)

    store = SplitStore.open(data.preprocessed_dir / "test.zarr")
    test_set = CaseDataset(data.preprocessed_dir, "test", tasks, patch_size=None, augment=False)
    structure_names = list(manifest.get("structure_names", []))
    per_case: dict[str, dict[str, dict[str, float]]] = {t.name: {} for t in tasks}
    image_level: dict[str, list] = {t.name: [] for t in tasks if not t.dense}
    labels: dict[str, list[int]] = {"covid": []}
    # The models were trained with these settings (`check_trained_on`): on patches of this size, if any.
    patch = settings.training.get("patch_size") if manifest.get("spatial_dims") == 3 else None
    for i in tqdm(
        range(len(test_set)), desc=f"evaluate {dataset}/{arch}/seed{seed} on {data.name}", disable=None
    ):
        item = test_set[i]
        case_id = item["case_id"]
        attrs = store.case_attrs(case_id)
        preds = predict(models, tasks, item["image"].to(dev), patch)
        check_finite(preds, paths, arch, case_id)
        check_shapes(preds, item, tasks, paths, arch, case_id)
        dense_out = {}
        for t in tasks:
            if t.kind == "regression":
                possible = item["possible_dose_mask"].numpy() > 0
                if not possible.any():  # a NaN score, left out of the mean unseen (openkbp-score refuses it)
                    problem = "the possible-dose mask is empty: the dose score would be 0/0"
                    raise CtanError(test_set.path / case_id, problem)
                # As the OpenKBP baseline does: no dose outside the possible-dose mask. The loss never
                # sees those voxels, yet the dose score's numerator runs over the whole grid.
                preds[t.name] = preds[t.name] * possible
                dense_out[t.name] = preds[t.name].astype(np.float32)
                per_case[t.name][case_id] = _dose_case(item, preds[t.name], attrs, structure_names, settings)
            elif t.kind == "segmentation":
                mask = (preds[t.name] > 0.5).astype(np.uint8)
                dense_out[t.name] = mask
                per_case[t.name][case_id] = _segmentation_case(t, item, mask, attrs, structure_names, metrics)
            else:
                image_level[t.name].append((case_id, int(item[t.name]), preds[t.name].ravel().tolist()))
        labels["covid"].append(int(attrs["labels"].get("covid", -1)))
        np.savez_compressed(pred_dir / f"{case_id}.npz", **dense_out)

    results: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for t in tasks:
        if t.kind == "regression":
            results[t.name] = _dose_results(t, data, manifest, store, pred_dir, per_case[t.name], details)
        elif t.kind == "segmentation":
            results[t.name] = _segmentation_results(t, per_case[t.name], store)
        else:
            results[t.name] = _classification_results(t, image_level[t.name], labels["covid"], metrics)
            # Labels kept beside the probabilities so that AUCs can be recomputed on resampled cases.
            per_case[t.name] = {
                cid: {"probability": p, "label": label, "covid": covid}
                for (cid, label, p), covid in zip(image_level[t.name], labels["covid"], strict=True)
            }
    _write_image_level(pred_dir / "image_level.csv", image_level)

    commit, dirty = code_version()
    run_ids, trained_on_machines = {}, {}
    for key in networks(arch, settings.tasks):
        run_file = model_dir(settings, arch, seed, key) / "run.json"
        if run_file.is_file():
            run_ids[key or "all"] = json.loads(run_file.read_text())["run_id"]
        history_file = model_dir(settings, arch, seed, key) / "history.json"
        if history_file.is_file():  # models trained before machines were recorded have none
            trained = json.loads(history_file.read_text()).get("machine")
            if trained:
                trained_on_machines[key or "all"] = trained
    document = {
        "dataset": data.name,
        "trained_on": dataset,
        "architecture": arch,
        "seed": seed,
        "tasks": results,
        # Which metrics enter Δ_MTL: the task records' bounded ones, or the params override.
        "primary_metrics": {t.name: list(t.primary_metrics) for t in tasks},
        "higher_is_better": {
            t.name: {m: metrics.higher_is_better(m) for m in results[t.name]} for t in tasks
        },
        "details": details,
        "per_case": per_case,
        "provenance": {
            "data_hash": manifest["data_hash"],
            "source_sha256": manifest.get("source_sha256"),
            "model_sha256": model_hashes,
            "git_commit": commit,
            "git_dirty": dirty,
            "mlflow_run_ids": run_ids,
            "tuning": _tuning_record(settings, arch),
            "machine": {"training": trained_on_machines, "evaluation": machine(str(dev))},
        },
    }
    (out / "metrics.json").write_text(strict_json(document))
    _log_to_mlflow(params, run_ids, results, prefix=f"external/{on}" if on else "test")
    if len(test_set):
        try:
            _plot_median_case(data, arch, seed, tasks, test_set, store, pred_dir, per_case, out)
        except ImportError:  # no matplotlib
            pass


def external_test_set(params: dict[str, Any], settings, on: str):
    """The settings of ``on``, refused unless it is an external test set of the dataset ``settings``."""
    data = dataset_settings(params, on)
    if data.external_of != settings.name:
        raise CtanError(
            None,
            f"--on {on}: not an external test set of {settings.name} "
            f"(it needs `external_of: {settings.name}` under datasets.{on})",
        )
    return data


def check_external_manifest(training: dict[str, Any], external: dict[str, Any], settings, data) -> None:
    """The external stores must describe the data the models were trained on, with the same plan."""
    from ctan.manifest import compatibility_problems

    problems = compatibility_problems(training, external)
    if "plan" in training and training["plan"] != external.get("plan"):
        problems.append(
            f"preprocessing plan differs ({external.get('plan')} here, {training.get('plan')} in the "
            f"training set): run `ctan preprocess {data.name} --force`"
        )
    if problems:
        raise CtanError(
            data.preprocessed_dir,
            f"external test set {data.name} does not match its training dataset {settings.name}: "
            + "; ".join(problems),
        )
    from ctan.leakage import check_external_apart

    check_external_apart(training, external, data.preprocessed_dir, (data.name, settings.name))


def check_external_intensity(settings, data) -> None:
    """The external test set's stores must be normalised as the training dataset's are (CT window)."""
    from ctan.training.trainer import store_intensity

    trained = store_intensity(settings.preprocessed_dir)
    path = data.preprocessed_dir / "test.zarr"
    here = store_intensity(data.preprocessed_dir, "test")
    if here != trained:
        raise CtanError(
            path,
            f"intensity mapping {here} differs from {trained} of the training dataset {settings.name}: "
            f"run `ctan preprocess {data.name} --force`",
        )


def median_case(tasks: list[Task], per_case: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
    """The test case with the median score of the first task, and a phrase that says so.

    Scores: dose score (Gy) for dose, Dice for segmentation, the probability given to the true class
    for classification. Of an even number of cases, the lower middle one; cases without a finite
    score are left out (all of them: the first case).
    """
    task = tasks[0]
    rows = per_case[task.name]
    if task.kind == "regression":
        name, unit, key = "dose score", " Gy", lambda v: v.get("dose_score")
    elif task.kind == "segmentation":
        name, unit, key = f"{task.name} Dice", "", lambda v: v.get("dice")
    else:
        name, unit, key = f"p(true {task.name} class)", "", _true_class_probability
    scored = sorted(
        (float(s), cid) for cid, v in rows.items() if (s := key(v)) is not None and np.isfinite(float(s))
    )
    if not scored:
        return next(iter(rows)), "the first test case (no case has a finite score)"
    value, case_id = scored[(len(scored) - 1) // 2]
    return (
        case_id,
        f"case {case_id}, the median {name} of {len(scored)} test cases ({value:.3g}{unit})",
    )


def _true_class_probability(row: dict[str, Any]) -> float:
    probs = np.asarray(row["probability"], dtype=np.float64).ravel()
    label = int(row["label"])
    if probs.size == 1:
        return float(probs[0] if label == 1 else 1 - probs[0])
    return float(probs[label])


def _plot_median_case(settings, arch, seed, tasks, test_set, store, pred_dir, per_case, out) -> None:
    """examples.png of the median test case (an axial slice as radiology shows it, where the format has a
    patient frame), and dvh.png of its dose, from what was saved and scored."""
    from ctan.datasets import get_reader
    from ctan.plots import axial_flips, plot_dvh, plot_examples, structure_colours

    case_id, phrase = median_case(tasks, per_case)
    item = test_set[test_set.case_ids.index(case_id)]
    saved = np.load(pred_dir / f"{case_id}.npz")
    preds = {
        t.name: saved[t.name] if t.dense else np.asarray(per_case[t.name][case_id]["probability"])
        for t in tasks
    }
    targets = {t.name: item[t.name].numpy() for t in tasks}
    names = list(read_manifest(settings.preprocessed_dir).get("structure_names", []))
    title = f"{settings.name} · {arch} · seed {seed}: {phrase}"
    world = get_reader(settings.format).WORLD
    flips = axial_flips(store.case_attrs(case_id).get("direction") or (), world) if world else None
    plot_examples(
        item["image"].numpy(),
        targets,
        preds,
        tasks,
        out / "examples.png",
        title=title,
        structure_names=names,
        flips=flips,
    )
    for t in tasks:
        if t.kind == "regression":
            reference, predicted, rois, spacing, oars, targets_ = _dvh_inputs(
                settings, store, pred_dir, t, case_id, names
            )
            plot_dvh(
                reference,
                predicted,
                rois,
                spacing,
                oars,
                targets_,
                out / "dvh.png",
                colours=structure_colours(names),
                title=title,
            )


def _dvh_inputs(settings, store, pred_dir, task, case_id, names):
    """The arrays a case's DVH metrics are computed from: reference and predicted dose, ROI masks,
    voxel size, OAR and target names. OpenKBP: the challenge files `score_directories` reads (the
    reference patient folder, the written prediction CSV); others: the preprocessed grid."""
    from ctan.metrics import dose as dose_metrics

    if settings.format == "openkbp":
        reference = dose_metrics.read_reference_patient(_openkbp_patients(settings)[case_id])
        predicted = dose_metrics.read_sparse_csv(pred_dir / "dose_csv" / f"{case_id}.csv", mask=False)
        return (
            reference["dose"],
            predicted,
            reference["structures"],
            reference["voxel_dimensions"],
            dose_metrics.OARS,  # the defaults `score_patient` scores with
            dose_metrics.TARGETS,
        )
    data = store.read_case(case_id)
    pred = np.load(pred_dir / f"{case_id}.npz")[task.name][0]
    present = data["attrs"].get("structure_present") or [True] * len(names)
    rois = (
        {n: data["structures"][i] > 0 for i, n in enumerate(names) if present[i]}
        if "structures" in data
        else {}
    )
    targets = [n for n in names if n.upper().startswith(TARGET_PREFIXES)]
    oars = [n for n in names if n not in targets]
    return data["dose"][0], pred, rois, data["attrs"]["spacing"], oars, targets


def _openkbp_reference(settings) -> list[Path]:
    """The challenge's reference folders of the cases scored: the test split, or every folder of an
    external test set (its patients are all test cases, from whichever folders they came)."""
    from ctan.datasets import find_root
    from ctan.datasets.base import SPLITS
    from ctan.datasets.openkbp import reference_folders

    root = settings.raw_dir / settings.subdir if settings.subdir else find_root(settings.raw_dir, "openkbp")
    return reference_folders(root, SPLITS if settings.external_of else ("test",))


def _openkbp_patients(settings) -> dict[str, Path]:
    """``{pt_*: reference patient folder}`` over `_openkbp_reference`."""
    return {p.name: p for folder in _openkbp_reference(settings) for p in folder.iterdir()}


def _tuning_record(settings, arch: str) -> dict[str, Any]:
    """What `ctan tune` chose for each network of this model and the validation score it won with."""
    from ctan.training.tuning import grid, needs_tuning

    if not needs_tuning(settings):
        return {"tuned": False, "values": {k: v[0] for k, v in grid(settings).items()}}
    out: dict[str, Any] = {"tuned": True}
    for key in networks(arch, settings.tasks):
        choice = json.loads(choice_path(settings, arch, key).read_text())
        out[key or "all"] = {"chosen": choice["chosen"], "validation_score": choice["chosen_score"]}
    return out


def _dose_case(item, pred, attrs, structure_names, settings) -> dict[str, float]:
    from ctan.metrics import dose as dose_metrics

    mask = item["possible_dose_mask"].numpy()[0] > 0
    return {"dose_score": float(dose_metrics.dose_score(item["dose"].numpy()[0], pred[0], mask))}


def _segmentation_case(task, item, mask, attrs, structure_names, metrics) -> dict[str, float]:
    from ctan.metrics import segmentation as seg

    target = item[task.name].numpy().astype(bool)
    pred = mask.astype(bool)
    spacing = tuple(attrs["spacing"])
    if task.target == "lesion":
        return {"dice": seg.dice(target[0], pred[0]), "jaccard": seg.jaccard(target[0], pred[0])}
    present = item["structure_present"].numpy().astype(bool)
    row: dict[str, float] = {}
    dices, hds = [], []
    for c, name in enumerate(structure_names):
        if not present[c]:
            continue
        d = seg.dice(target[c], pred[c])
        row[f"dice/{name}"] = d
        dices.append(d)
        if len(spacing) == 3:
            h = seg.hd95(target[c], pred[c], spacing)
            row[f"hd95/{name}"] = h
            hds.append(h)
    row["dice"] = seg.nanmean(dices)
    if hds:
        # A structure missed entirely (inf) counts as the image diagonal, not as nothing.
        row["hd95"] = seg.mean_hd95(hds, seg.image_diagonal_mm(target.shape[1:], spacing))
    return row


def _segmentation_results(task, per_case, store) -> dict[str, float]:
    from ctan.metrics import segmentation as seg

    rows = list(per_case.values())
    out = {"dice": seg.nanmean(v.get("dice", float("nan")) for v in rows)}
    if task.target == "lesion":
        # ISIC 2018 task 1: per-image Jaccard, below 0.65 counts as 0; both-empty images skipped.
        out["jaccard_thresholded"] = seg.thresholded_mean(v["jaccard"] for v in rows)
    elif any("hd95" in v for v in rows):
        out["hd95"] = seg.nanmean(v.get("hd95", float("nan")) for v in rows)
    return out


def _dose_results(task, settings, manifest, store, pred_dir, per_case, details) -> dict[str, float]:
    """OpenKBP: challenge CSVs on the original grid, scored as the challenge does. Others: on our grid."""
    from ctan.metrics import dose as dose_metrics

    if settings.format == "openkbp":
        from ctan.datasets.openkbp import to_challenge_grid

        csv_dir = pred_dir / "dose_csv"
        csv_dir.mkdir()
        reference = _openkbp_reference(settings)
        patients = _openkbp_patients(settings)
        for case_id in per_case:
            pred = np.load(pred_dir / f"{case_id}.npz")[task.name]
            source = to_challenge_grid(to_source_grid(pred, store.case_attrs(case_id), order=1)[0])
            # As the challenge's own baseline does: predictions are masked by the possible-dose mask.
            mask = dose_metrics.read_sparse_csv(patients[case_id] / "possible_dose_mask.csv", mask=True)
            dose_metrics.write_dose_csv(csv_dir / f"{case_id}.csv", source * mask, axes="challenge")
        scored = dose_metrics.score_directories(reference, csv_dir)
        for case_id, row in scored["patients"].items():
            # A patient without a contoured ROI has no DVH score (None): NaN, as metrics.json has it.
            per_case.setdefault(case_id, {}).update(
                {k: float("nan") if v is None else float(v) for k, v in row.items()}
            )
        details["openkbp_challenge"] = {"dose_score": scored["dose_score"], "dvh_score": scored["dvh_score"]}
        return {"dose_score": float(scored["dose_score"]), "dvh_score": float(scored["dvh_score"])}
    # Bring-your-own cases: DVH on the preprocessed grid, targets recognised by name.
    names = list(manifest.get("structure_names", []))
    dvh_rows = []
    for case_id in per_case:
        reference, pred, rois, spacing, oars, targets = _dvh_inputs(
            settings, store, pred_dir, task, case_id, names
        )
        ref_m = dose_metrics.dvh_metrics(reference, rois, spacing, oars=oars, targets=targets)
        pred_m = dose_metrics.dvh_metrics(pred, rois, spacing, oars=oars, targets=targets)
        score = dose_metrics.dvh_score([ref_m], [pred_m])
        per_case[case_id]["dvh_score"] = float(score)
        per_case[case_id]["dvh_count"] = dose_metrics.dvh_count(ref_m, pred_m)
        dvh_rows.append((ref_m, pred_m))
    dvh = (
        dose_metrics.dvh_score([r for r, _ in dvh_rows], [p for _, p in dvh_rows])
        if dvh_rows
        else float("nan")
    )
    from ctan.metrics.segmentation import nanmean

    return {"dose_score": nanmean(v["dose_score"] for v in per_case.values()), "dvh_score": float(dvh)}


def _classification_results(task, rows, covid_labels, metrics) -> dict[str, float]:
    from ctan.metrics import classification as cls

    y_true = np.array([r[1] for r in rows])
    probs = np.array([r[2] for r in rows])
    if task.target == "diagnosis":
        return {
            "balanced_accuracy": float(cls.balanced_accuracy(y_true, probs.argmax(1))),
            "auc_macro": float(cls.macro_auc(y_true, probs, n_classes=task.classes)),
        }
    p = probs[:, 0] if probs.ndim == 2 else probs
    if task.target == "severity":
        covid = np.array(covid_labels)
        return {"auc_covid_positive": float(cls.binary_auc(y_true[covid == 1], p[covid == 1]))}
    return {"auc": float(cls.binary_auc(y_true, p))}


def _write_image_level(path: Path, image_level: dict[str, list]) -> None:
    lines = ["case_id,task,label,probabilities"]
    for task, rows in image_level.items():
        for case_id, label, probs in rows:
            lines.append(f"{case_id},{task},{label},{' '.join(f'{p:.6f}' for p in probs)}")
    path.write_text("\n".join(lines) + "\n")


def _log_to_mlflow(
    params, run_ids: dict[str, str], results: dict[str, dict[str, float]], prefix: str = "test"
) -> None:
    from ctan import tracking

    for key, run_id in run_ids.items():
        with tracking.existing_run(params, run_id):
            tracking.log_metrics(
                {
                    f"{prefix}/{t}/{m}": v
                    for t, ms in results.items()
                    if key in ("all", t)
                    for m, v in ms.items()
                }
            )
