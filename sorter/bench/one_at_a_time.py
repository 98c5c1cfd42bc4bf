"""What a first version classifies with: one photo at a time, full-size decode, fp32, batch of one.

Shared by the naive loop (stage 3) and the Quix Streams application (stage 5), so the two differ only
in how they move messages, not in what they do with a photo.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch


class OnePhoto:
    def __init__(self, checkpoint: Path, device: str = "cpu") -> None:
        from sorter.model.checkpoint import load_checkpoint

        self.device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_checkpoint(checkpoint, self.device)
        self.mean = torch.tensor(self.meta.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.meta.std).view(1, 3, 1, 1)

    def __call__(self, payload: bytes) -> tuple[str, float]:
        """The most probable label of one JPEG and its probability."""
        size = self.meta.image_size
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        x = (torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0) / 255 - self.mean) / self.std
        with torch.no_grad():
            probs = torch.softmax(self.model(x.to(self.device)), dim=1)[0]
        conf, idx = probs.max(0)
        return self.meta.classes[int(idx)], float(conf)
