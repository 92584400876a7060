"""Privacy / memorization check: are generated clips closer to the training set than real new clips?

For every generated clip, the distance to its nearest training clip; for every held-out real
clip (never trained on), the same. A held-out clip shows how close a genuinely new patient comes
to the training set by chance, so a generated clip closer to a training clip than any held-out
clip is flagged as a possible copy (EchoNet-Synthetic's re-identification question). Distances are
RMS differences in [0, 1] intensity (pixel space) or of the tokenizer's pre-quantization latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def nearest(queries: np.ndarray, refs: np.ndarray, batch: int = 256, device=None) -> tuple[np.ndarray, np.ndarray]:
    """RMS distance from each query row to its nearest reference row, and that row's index.

    Args:
        queries: (N, D) float.
        refs: (M, D) float, M >= 1.
    """
    import torch

    r = torch.as_tensor(np.asarray(refs, np.float32), device=device or "cpu")
    dist, index = [], []
    for k in range(0, len(queries), batch):
        q = torch.as_tensor(np.asarray(queries[k:k + batch], np.float32), device=r.device)
        d = torch.cdist(q.double(), r.double())  # (b, M) Euclidean
        best, at = d.min(dim=1)
        dist.append(best.cpu())
        index.append(at.cpu())
    d = torch.cat(dist).numpy() / np.sqrt(queries.shape[1])
    return d, torch.cat(index).numpy()


def memorization_check(generated: np.ndarray, heldout: np.ndarray, train: np.ndarray,
                       generated_ids: list[str], train_ids: list[str], space: str,
                       device=None) -> dict[str, Any]:
    """The share of generated clips closer to a training clip than any held-out real clip is.

    Args:
        generated, heldout, train: (N, D), (H, D), (M, D) flattened clips (or latents).
        generated_ids: a name per generated row (``clip_id#sample``).
        train_ids: the training clips' ``clip_id``.
        space: ``pixel`` or ``latent`` (recorded in the result).
    """
    g_dist, g_at = nearest(generated, train, device=device)
    h_dist, _ = nearest(heldout, train, device=device)
    threshold = float(h_dist.min())
    flagged = np.flatnonzero(g_dist < threshold)
    return {
        "space": space,
        "share_closer_than_heldout": float(len(flagged) / len(g_dist)),
        "threshold": threshold,
        "generated_clips": int(len(generated)), "heldout_clips": int(len(heldout)),
        "train_clips": int(len(train)),
        "generated_nearest_median": float(np.median(g_dist)),
        "heldout_nearest_median": float(np.median(h_dist)),
        "flagged": [{"generated": generated_ids[i], "nearest_train": train_ids[int(g_at[i])],
                     "distance": float(g_dist[i])} for i in flagged],
        "note": "flagged: a generated clip nearer (RMS) to a training clip than the nearest held-out "
                "real clip is to any training clip; threshold is that held-out distance",
    }
