"""Multi-task loss weighting: turns {task: loss} into one loss.

- ``equal``: Σ_t L_t.
- ``uncertainty`` (Kendall, Gal & Cipolla 2018): Σ_t exp(−s_t)·L_t + s_t with learnable s_t = log σ_t².
- ``dwa`` (Liu, Johns & Davison 2019): w_t(e) = T·softmax_t(r_t(e−1)/τ), r_t(e−1) = L_t(e−1)/L_t(e−2),
  w = 1 for the first two epochs; uses epoch-mean training losses.
"""

from __future__ import annotations

import torch
from torch import nn


class LossWeighting(nn.Module):
    """Base: holds the task names and the epoch-level loss history DWA needs."""

    def __init__(self, task_names: list[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(losses[t] for t in self.task_names)

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """Called with the epoch's mean training loss per task."""

    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.task_names, 1.0)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class EqualWeighting(LossWeighting):
    pass


class UncertaintyWeighting(LossWeighting):
    def __init__(self, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(task_names)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for i, t in enumerate(self.task_names):
            total = total + torch.exp(-self.log_vars[i]) * losses[t] + self.log_vars[i]
        return total

    def weights(self) -> dict[str, float]:
        return {t: float(torch.exp(-self.log_vars[i])) for i, t in enumerate(self.task_names)}


class DynamicWeightAverage(LossWeighting):
    def __init__(self, task_names: list[str], temperature: float = 2.0) -> None:
        super().__init__(task_names)
        self.temperature = temperature
        self.history: list[dict[str, float]] = []
        self._w = dict.fromkeys(task_names, 1.0)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self._w[t] * losses[t] for t in self.task_names)

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        self.history.append({t: float(epoch_losses[t]) for t in self.task_names})
        self._update()

    def _update(self) -> None:
        if len(self.history) < 2:
            self._w = dict.fromkeys(self.task_names, 1.0)
            return
        prev, prev2 = self.history[-1], self.history[-2]
        ratios = torch.tensor([prev[t] / max(prev2[t], 1e-12) for t in self.task_names])
        w = len(self.task_names) * torch.softmax(ratios / self.temperature, dim=0)
        self._w = {t: float(w[i]) for i, t in enumerate(self.task_names)}

    def weights(self) -> dict[str, float]:
        return dict(self._w)

    def extra_state(self) -> dict:
        return {"history": self.history}

    def load_extra_state(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self._update()


def build_weighting(name: str, task_names: list[str], dwa_temperature: float = 2.0) -> LossWeighting:
    if name == "equal":
        return EqualWeighting(task_names)
    if name == "uncertainty":
        return UncertaintyWeighting(task_names)
    if name == "dwa":
        return DynamicWeightAverage(task_names, dwa_temperature)
    raise ValueError(f"unknown loss weighting {name!r} (equal, uncertainty, dwa)")
