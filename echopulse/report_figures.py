"""Pictures for the evaluation report: real against generated frames with the ECG under them."""

from __future__ import annotations

import numpy as np

from echopulse.config import ECG_FS


def strip_figure(real: np.ndarray, generated: np.ndarray, ecg: np.ndarray, fps: float, title: str,
                 path: str, lead_mask: np.ndarray | None = None, max_frames: int = 8) -> str:
    """A PNG: real frames on top, generated frames below, the conditioning ECG under both.

    Args:
        real, generated: uint8 (T, H, W) clips of one ECG.
        ecg: (12, L) prepared ECG at ``ECG_FS`` Hz; sample 0 is the time of frame 0.
        fps: the clips' frame rate (frame ticks on the ECG axis).
        title: figure title (the view and clip).
        path: output file.
        lead_mask: the ECG's recorded leads (the panel draws lead II, else the first real one).
        max_frames: frames shown, spread evenly over the clip.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from echopulse.panel import panel_lead

    picks = np.unique(np.linspace(0, len(real) - 1, min(len(real), max_frames)).round().astype(int))
    cols = len(picks)
    fig = plt.figure(figsize=(1.4 * cols, 4.4), dpi=100)
    grid = fig.add_gridspec(3, cols, height_ratios=[1, 1, 0.8], hspace=0.15, wspace=0.03)
    for row, (video, name) in enumerate(((real, "real"), (generated, "generated"))):
        for c, t in enumerate(picks):
            ax = fig.add_subplot(grid[row, c])
            ax.imshow(video[t], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if row == 0:
                ax.set_title(f"{t / fps:.2f} s", fontsize=7)
    trace, lead = panel_lead(ecg, lead_mask)
    seconds = len(real) / fps
    n = min(len(trace), int(round(seconds * ECG_FS)))
    ax = fig.add_subplot(grid[2, :])
    ax.plot(np.arange(n) / ECG_FS, trace[:n], lw=0.8, color="black")
    for t in picks:
        ax.axvline(t / fps, color="tab:red", lw=0.5, alpha=0.6)
    ax.set_xlim(0, seconds)
    ax.set_yticks([])
    ax.set_xlabel(f"ECG lead {lead} (s)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
