"""Task records: what a model predicts for one task, how it is scored and which way is better.

Architectures, tasks and loss weighting are kept apart (as in LibMTL): a model is built from a list of
`Task`s and returns `{task.name: prediction}`; the trainer picks each task's loss from its kind; the
evaluator picks its metrics. A dataset module declares which tasks it offers (`TASKS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
