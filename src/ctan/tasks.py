"""Task records: what a model predicts for one task, how it is scored and which way is better.

Architectures, tasks and loss weighting are kept apart (as in LibMTL): a model is built from a list of
`Task`s and returns `{task.name: prediction}`; the trainer picks each task's loss from its kind; the
evaluator picks its metrics. A dataset module declares which tasks it offers (`TASKS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ctan.errors import CtanError

if TYPE_CHECKING:
    from ctan.config import DatasetSettings

Kind = Literal["segmentation", "regression", "classification"]


@dataclass(frozen=True)
class Task:
    """One prediction target.

    kind:
        ``segmentation`` dense masks with ``channels`` structures (``multilabel``: structures may
        overlap, one sigmoid each; otherwise softmax over ``channels`` classes incl. background);
        ``regression`` dense real values with ``channels`` channels (dose in Gy);
        ``classification`` image-level with ``classes`` classes (2 = binary, one logit).
    target:
        the array or label name in the preprocessed store (``dose``, ``structures``, ``lesion``,
        ``diagnosis``, ``covid``, ``severity``).
    metrics:
        every metric reported for the task (directions in `ctan.metrics.METRICS`).
    primary_metrics:
        the bounded subset that enters Δ_MTL (a relative change of an unbounded metric such as HD95 is
        itself unbounded: one missed structure would decide the headline). A dataset entry's
        ``primary_metrics: {task: [...]}`` in params.yaml overrides it.
    output_scale:
        dense regression heads predict in units of this (10 Gy for dose), so that a network whose
        activations are of order 1 reaches clinical doses (up to ~80 Gy) in a few hundred steps.
    """

    name: str
    kind: Kind
    target: str
    channels: int = 1
    classes: int = 0
    multilabel: bool = False
    class_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = field(default_factory=tuple)
    primary_metrics: tuple[str, ...] = field(default_factory=tuple)
    output_scale: float = 1.0

    @property
    def dense(self) -> bool:
        """Pixel-level tasks need a decoder; image-level tasks a pooled head."""
        return self.kind in ("segmentation", "regression")

    @property
    def out_channels(self) -> int:
        """Number of output channels (dense) or logits (image-level) the head must produce."""
        if self.kind == "classification":
            return 1 if self.classes == 2 else self.classes
        return self.channels

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with torch.load(weights_only=True)."""
        out = dataclasses.asdict(self)
        for key in ("class_names", "metrics", "primary_metrics"):
            out[key] = list(getattr(self, key))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # checkpoints from before a field was dropped
        tuples = {k: tuple(data.get(k, ())) for k in ("class_names", "metrics", "primary_metrics")}
        return cls(**{**data, **tuples})


def dataset_tasks(settings: DatasetSettings, manifest: dict[str, Any], only: str | None = None) -> list[Task]:
    """The dataset's configured tasks, with channel/class counts taken from its preprocessed data.

    Bring-your-own cases define their own structures, so the count is known only after preprocessing.
    """
    from ctan.datasets import get_reader

    reader = get_reader(settings.format)
    names = list(settings.tasks)
    if only is not None:
        if only not in names:
            raise CtanError(None, f"task {only!r} is not a task of {settings.name} ({', '.join(names)})")
        names = [only]
    tasks = []
    for name in names:
        if name not in reader.TASKS:
            raise CtanError(
                None,
                f"datasets.{settings.name}.tasks: format {settings.format} offers no task {name!r} "
                f"({', '.join(reader.TASKS)})",
            )
        task = reader.TASKS[name]
        if task.target == "structures":
            task = dataclasses.replace(task, channels=len(manifest["structure_names"]))
        if name in settings.primary_metrics:
            task = dataclasses.replace(task, primary_metrics=_primary_override(settings, task))
        if task.kind == "classification" and task.target == "diagnosis" and manifest.get("class_names"):
            classes = manifest["class_names"]
            task = dataclasses.replace(task, classes=len(classes), class_names=tuple(classes))
        tasks.append(task)
    return tasks


def _primary_override(settings: DatasetSettings, task: Task) -> tuple[str, ...]:
    chosen = tuple(settings.primary_metrics[task.name])
    unknown = [m for m in chosen if m not in task.metrics]
    if unknown or not chosen:
        raise CtanError(
            None,
            f"datasets.{settings.name}.primary_metrics.{task.name}: {', '.join(unknown) or 'empty'} "
            f"not among the task's metrics ({', '.join(task.metrics)})",
        )
    return chosen


# Dose prediction is the same task wherever it appears (OpenKBP, bring-your-own cases).
DOSE = Task(
    name="dose",
    kind="regression",
    target="dose",
    channels=1,
    metrics=("dose_score", "dvh_score"),
    primary_metrics=("dose_score", "dvh_score"),
    output_scale=10.0,  # Gy
)


def structures_task(names: tuple[str, ...] = ()) -> Task:
    """Contouring is, like dose, the same task wherever it appears; only the structure names differ.

    Bring-your-own cases know their names only from the data (``()`` here; `dataset_tasks` sets the
    count). HD95 is reported but not primary: it is unbounded (see `Task.primary_metrics`).
    """
    return Task(
        name="structures",
        kind="segmentation",
        target="structures",
        channels=len(names),
        multilabel=True,
        class_names=names,
        metrics=("dice", "hd95"),
        primary_metrics=("dice",),
    )


def label_task(name: str, class_names: tuple[str, ...], metrics: tuple[str, ...]) -> Task:
    """An image-level label stored under the task's own name, one class per name.

    Every classification metric is bounded (AUCs, balanced accuracy), so all of them are primary.
    """
    return Task(
        name=name,
        kind="classification",
        target=name,
        classes=len(class_names),
        class_names=class_names,
        metrics=metrics,
        primary_metrics=metrics,
    )
