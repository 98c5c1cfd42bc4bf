"""Temperature scaling: one scalar T fitted by minimising validation NLL of ``softmax(logits / T)``.

It changes no prediction (argmax is unchanged), only how confident the model claims to be.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 10.0


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
    # A perfectly separated validation set drives T towards 0 (infinite confidence); the bounds keep
    # a margin so a few low-confidence items still reach manual review until more data says otherwise.
    return min(max(float(log_t.detach().exp()), MIN_TEMPERATURE), MAX_TEMPERATURE)
