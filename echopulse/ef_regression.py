"""Ejection fraction of a clip by a user-supplied regressor, and its agreement with the truth.

The regressor is a TorchScript file (e.g. an exported EchoNet-Dynamic R(2+1)D) called as
``net(videos)`` with float32 ``(N, 3, T, H, W)`` in [0, 1] at the clip's size (grey repeated to
RGB) and returning ``(N,)`` or ``(N, 1)`` EF in percent; resizing and normalisation belong inside
the exported module. Agreement is reported in EF points (percent), as the literature does.
"""

from __future__ import annotations

import numpy as np

from echopulse.errors import EchoPulseError

BEST_OF = 3  # EchoDiffusion: the best of 3 samples per video


def predict_ef(net, videos: np.ndarray, batch: int = 8, device=None) -> np.ndarray:
    """EF (percent) of uint8 clips (N, T, H, W) by the regressor: float64 (N,)."""
    import torch

    out = []
    with torch.inference_mode():
        for k in range(0, len(videos), batch):
            x = torch.as_tensor(np.ascontiguousarray(videos[k:k + batch])).float().div(255.0)
            x = x[:, None].repeat(1, 3, 1, 1, 1).to(device or "cpu")
            y = torch.as_tensor(net(x)).float().cpu().reshape(len(x), -1)
            if y.shape[1] != 1:
                raise EchoPulseError(f"the EF model returned {tuple(y.shape)} for {len(x)} clips; "
                                     "expected one EF per clip")
            out.append(y[:, 0])
    return torch.cat(out).double().numpy()


def agreement(predicted, truth) -> dict[str, float]:
    """R², MAE and RMSE of predicted against true EF (both in EF points), over finite pairs.

    R² is ``1 - SS_res / SS_tot`` against the truth's own mean: a constant prediction scores at
    most 0. ``nan`` for R² when the truth does not vary.
    """
    p, t = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    if not len(t):
        return {"r2": float("nan"), "mae": float("nan"), "rmse": float("nan"), "clips": 0}
    err = p - t
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    return {"r2": float(1 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan"),
            "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))), "clips": int(len(t))}


def best_of(predicted: np.ndarray, truth: np.ndarray, k: int = BEST_OF) -> np.ndarray:
    """Per clip, the prediction among its first ``k`` samples closest to the truth.

    Args:
        predicted: (N, S) EF of S samples per clip.
        truth: (N,) true EF.
    """
    p = np.asarray(predicted, np.float64)[:, :k]
    err = np.abs(p - np.asarray(truth, np.float64)[:, None])
    err = np.where(np.isfinite(err), err, np.inf)
    return p[np.arange(len(p)), np.argmin(err, axis=1)]
