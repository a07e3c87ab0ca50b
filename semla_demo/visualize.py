"""Pictures of predictions: class colours, colour overlays with a legend, and adapter-weight bar charts.

Colours: a class whose name is a Cityscapes class ("road", "car", ...) gets the Cityscapes colour; every
other class a colour of a fixed palette (the same name always gets the same colour). Figures are drawn
with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["class_colours", "cityscapes_palette", "overlay", "save_overlay", "save_weights_chart"]

# A fixed palette for classes outside Cityscapes (tab20-like, well separated hues).
_FIXED = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
        (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
        (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
        (219, 219, 141), (158, 218, 229),
    ],
    dtype=np.uint8,
)  # fmt: skip


def cityscapes_palette() -> np.ndarray:
    """(256, 3) uint8 colour of each Cityscapes train id (black for 255 and unused ids)."""
    from cityscapesscripts.helpers.labels import trainId2label

    palette = np.zeros((256, 3), dtype=np.uint8)
    for train_id, label in trainId2label.items():
        if 0 <= train_id < 255:
            palette[train_id] = label.color
    return palette


def class_colours(class_names: Sequence[str]) -> np.ndarray:
    """(T, 3) uint8: the Cityscapes colour of Cityscapes classes, a fixed palette colour otherwise."""
    from cityscapesscripts.helpers.labels import name2label

    colours = np.zeros((len(class_names), 3), dtype=np.uint8)
    for i, name in enumerate(class_names):
        key = name.split(", ")[0].strip().lower()
        label = name2label.get(key)
        if label is not None and 0 <= label.trainId < 255:
            colours[i] = label.color
        else:  # stable across runs and vocabularies: from the name, not the position
            colours[i] = _FIXED[int(hashlib.sha1(key.encode()).hexdigest(), 16) % len(_FIXED)]
    return colours


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the class colours over the image.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) class ids (indices into ``colours``; other values are left unpainted).
        colours: (T, 3) uint8.
        alpha: opacity of the colours.
    Returns:
        (H, W, 3) uint8.
    """
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(colours))
    painted = colours[np.where(valid, labels, 0)].astype(np.float32)
    out = image.astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * painted[valid]
    return out.round().clip(0, 255).astype(np.uint8)


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str = "",
    max_legend: int = 24,
) -> Path:
    """The image with its coloured prediction beside it and a legend of the classes present.

    Args:
        path: PNG to write.
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) predicted class ids.
        class_names: the vocabulary (index = class id).
        title: a line above the pictures.
        max_legend: at most this many classes in the legend (the largest first).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = class_colours(class_names)
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    present = [int(i) for _, i in sorted(zip(-counts, ids)) if 0 <= i < len(class_names)][:max_legend]
    height, width = image.shape[:2]
    scale = 4.0 / max(height, width)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width * scale + 0.4, height * scale + 0.7))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(overlay(image, labels, colours))
    axes[1].set_title("prediction", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(facecolor=colours[i] / 255.0, edgecolor="black", label=class_names[i]) for i in present]
    # the legend just right of the prediction; the saved picture is cropped to what is drawn
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def save_weights_chart(path: str | Path, weights: Mapping[str, float], *, title: str = "") -> Path:
    """A horizontal bar chart of adapter weights (which domains the model borrowed from), largest on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(weights.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(5.5, 0.45 * len(items) + 1.1))
    bars = ax.barh([name for name, _ in items], [w for _, w in items], color="#e65100")
    for bar, (_, w) in zip(bars, items):
        ax.text(
            bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{w:.3f}", va="center", fontsize=8
        )
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("weight")
    ax.set_title(title or "adapter weights", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
