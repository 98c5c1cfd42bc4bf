"""Temperature scaling: one scalar T fitted by minimising the calibration split's NLL of ``softmax(logits / T)``.

It changes no prediction (argmax is unchanged), only how confident the model claims to be. On a split the
model gets entirely right, the NLL-optimal T goes to 0 and every confidence to exactly 1.000, so the
review threshold could never fire. A finite sample cannot show a model is never wrong: the fit keeps the
mean confidence at or below the Laplace estimate of the accuracy, ``(correct + 1) / (n + 2)``, raising T
(by bisection: mean confidence falls as T grows) where the NLL optimum would claim more.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Best T for uncalibrated ``logits`` ``(n, k)``; 1.0 when there is nothing to fit."""
    if logits.shape[0] < 2:
        return 1.0
    logits, labels = logits.detach().float().clone(), labels.clone()  # may come from inference_mode
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    nll = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = min(max(float(log_t.detach().exp()), MIN_TEMPERATURE), MAX_TEMPERATURE)
    correct = int((logits.argmax(dim=1) == labels).sum())
    bound = (correct + 1) / (logits.shape[0] + 2)

    def mean_confidence(temperature: float) -> float:
        return float(torch.softmax(logits / temperature, dim=1).max(dim=1).values.mean())

    if mean_confidence(t) <= bound:
        return t
    low, high = t, MAX_TEMPERATURE  # mean confidence(low) > bound >= mean confidence(high)
    for _ in range(60):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if mean_confidence(mid) > bound else (low, mid)
    return high
