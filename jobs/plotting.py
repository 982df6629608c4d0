"""Training curves as a PNG: loss and throughput per step, epoch boundaries marked.

Used by ``sparkbridge demo`` (training.png), ``sparkbridge train --out`` and the notebooks. matplotlib
loads only when a plot is drawn, with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence, Union

__all__ = ["plot_training"]


def plot_training(history: Mapping[str, Sequence[float]], path: Union[str, "os.PathLike[str]"], *, title: str = "",
                  loss_label: str = "loss") -> None:
    """Loss (raw and a moving average) and rows/s over steps; ``history`` has per-step lists
    ``step``, ``loss``, ``rows``, ``seconds`` and ``epoch`` (as :class:`jobs.loop.FitResult` keeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.asarray(history["step"])
    if steps.size == 0:
        raise ValueError(f"{path}: no training steps to plot")
    window = max(1, min(50, len(steps) // 10))

    def smooth(values):
        v = np.asarray(values, dtype=np.float64)
        return np.convolve(v, np.ones(window) / window, mode="valid"), steps[window - 1:]

    fig, (ax_loss, ax_rate) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax_loss.plot(steps, history["loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label="batch loss")
    sm, sx = smooth(history["loss"])
    ax_loss.plot(sx, sm, color="tab:blue", label=f"moving average ({window} steps)")
    ax_loss.set_ylabel(loss_label)
    ax_loss.legend(loc="upper right")
    rows, rx = smooth(history["rows"])
    secs, _ = smooth(history["seconds"])
    ax_rate.plot(rx, rows / np.maximum(secs, 1e-9) / 1000.0, color="tab:green")  # rows / time over the window
    ax_rate.set_ylabel("training rows/s (thousands)")
    ax_rate.set_xlabel("step")
    epochs = np.asarray(history["epoch"])
    for boundary in steps[1:][np.diff(epochs) != 0]:
        for ax in (ax_loss, ax_rate):
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(title or "sparkbridge: training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
