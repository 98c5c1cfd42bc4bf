"""Offline, not a test: do pooled-feature scores separate unknown products better than the logit scores
sorter serves (model/ood.py)? On the work folder `benchmarks/unknown_products.py` leaves (its model.pt and
tree/): class means and a shared covariance of the pooled features (Mahalanobis) and the 10th-nearest
training photo by cosine, each thresholded at 2% on a fifth of the training photos (some of which trained
the model: indicative, not the protocol). Prints and ends with one JSON line.

    python benchmarks/probes/unknown_features.py /tmp/sorter-unknown-XXXX
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from sorter.data.folder import Sample, images_under, scan
from sorter.model.checkpoint import load_checkpoint
from sorter.model.ood import at_threshold, auroc, fit_threshold
from sorter.model.preprocess import Normalizer
from sorter.train.evaluate import decoded_loader

work = Path(sys.argv[1])
model, meta = load_checkpoint(work / "model.pt")
norm = Normalizer(meta.mean, meta.std, torch.device("cpu"))


def feats(samples):
    loader = decoded_loader(samples, meta.image_size, 64, "features")
    out, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            f, _ = model.forward_features(norm(x, nhwc=False))
            out.append(f.float())
            labels.append(y)
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


classes, train = scan(work / "tree" / "train", meta.classes)
_, known = scan(work / "tree" / "test", meta.classes)
unknown = [Sample(p, 0) for p in images_under(work / "tree" / "unknown")]
rng = np.random.default_rng(0)
idx = rng.permutation(len(train))
fit_idx, cal_idx = idx[: int(0.8 * len(idx))], idx[int(0.8 * len(idx)) :]
ftr, ytr = feats([train[i] for i in fit_idx])
fcal, _ = feats([train[i] for i in cal_idx])
fk, _ = feats(known)
fu, _ = feats(unknown)
means = np.stack([ftr[ytr == c].mean(0) for c in range(len(classes))])
centered = np.concatenate([ftr[ytr == c] - means[c] for c in range(len(classes))])
cov = np.cov(centered, rowvar=False) + 1e-3 * np.eye(ftr.shape[1])
prec = np.linalg.inv(cov)


def maha(f):
    d = f[:, None, :] - means[None]
    return np.einsum("nkd,de,nke->nk", d, prec, d).min(1)


def knn(f, k=10):
    a = ftr / np.linalg.norm(ftr, axis=1, keepdims=True)
    b = f / np.linalg.norm(f, axis=1, keepdims=True)
    sims = b @ a.T
    return -np.sort(sims, axis=1)[:, -k]


out = {}
for name, fn in (("mahalanobis", maha), ("knn10_cosine", knn)):
    cal, k, u = fn(fcal), fn(fk), fn(fu)
    t = fit_threshold(cal, 0.02)
    out[name] = {"auroc": round(auroc(k, u), 4)} | {n: round(v, 4) for n, v in at_threshold(k, u, t).items()}
    print(name, out[name], flush=True)
print(json.dumps(out))
