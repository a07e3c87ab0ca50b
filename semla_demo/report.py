"""The demo's report: the results tables, the embedder's retrieval, the transfer matrix, and pictures.

- ``miou.png``: per target domain, the reported value (cityscapesScripts IoU) of zero-shot, uniform, SemLA
  and oracle, with the mean, for both settings (the target's adapter in the library / left out);
- ``semla_weights.png``: the mean SemLA weight of each source adapter per target, for both settings;
- ``retrieval.png``: for each condition, the share of its validation images whose nearest prototype (by
  the demo's SemLA score) is each library domain;
- ``transfer.png``: the IoU of every adapter alone on every target (the diagonal is the oracle);
- ``examples.png``: validation images of a few targets with their ground truth and the predictions of
  zero-shot, uniform and SemLA in the leave-one-out setting (each image with the weights
  ``experiments.py`` gave it, read from its ``weights.json``).

``summary.txt`` prints the tables and matrices, ``summary.json`` holds the same numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .common import EVAL_OPTS, METHOD_LABELS, METHODS, MODEL_OVERLAY, SEMLA_CONFIG
from .visualize import cityscapes_palette

logger = logging.getLogger(__name__)

BASE_TARGET = "muses-clear-day"  # the condition the base model is trained on
EXAMPLE_TARGETS = (
    "muses-clear-day",
    "muses-fog-day",
    "muses-rain-night",
    "muses-snow-day",
    "muses-clear-night",
)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def results_table(*folders: Path) -> dict[str, dict[str, float]]:
    """``{target: {method: value}}`` from ``experiments.py`` output folders (one sub-folder per method);
    a method found in several folders is taken from the last."""
    table: dict[str, dict[str, float]] = {}
    for folder in folders:
        for method in METHODS:
            if (folder / method / "results.json").is_file():
                for target, value in _read(folder / method / "results.json").items():
                    table.setdefault(target, {})[method] = value
    return table


def mean_weights(folder: Path, sources: list[str]) -> np.ndarray:
    """(targets, sources) mean SemLA weight of each source over each target's images."""
    weights = _read(folder / "semla" / "weights.json")
    out = np.zeros((len(weights), len(sources)))
    for i, images in enumerate(weights.values()):
        for entry in images.values():
            for name, w in zip(entry["adapters"], entry["weights"]):
                out[i, sources.index(name)] += w / len(images)
    return out


def retrieval_confusion(world: Path, clip: Path, library: Path, domains: list[str]) -> np.ndarray:
    """(conditions, prototypes) counts: each validation image's condition against its nearest prototype.

    "Nearest" is the best score of the demo's SemLA measure (``configs/demo/semla_config.yaml``), over
    every prototype of the library (the target's own included): the diagonal holds the images that SemLA
    would give their own condition's adapter the largest weight.
    """
    from domain_orchestrator.embedding import load_embedder
    from domain_orchestrator.orchestrator import load_semla_config
    from domain_orchestrator.prototypes import read_statistics
    from domain_orchestrator.retrieval import scores

    from .world import MANIFEST

    embedder = load_embedder(str(clip))
    prototypes = torch.from_numpy(np.stack([read_statistics(library / d, d) for d in domains]))
    entries = [e for e in _read(world / MANIFEST)["entries"] if e["split"] == "val"]
    vectors = torch.from_numpy(embedder.embed_files([world / e["image"] for e in entries], progress=False))
    nearest = scores(vectors, prototypes, load_semla_config(SEMLA_CONFIG).measure).argmax(dim=1)
    confusion = np.zeros((len(domains), len(domains)), dtype=np.int64)
    for entry, j in zip(entries, nearest.tolist()):
        confusion[domains.index(f"muses-{entry['weather']}-{entry['time']}"), j] += 1
    return confusion


def retrieval_accuracy(confusion: np.ndarray, domains: list[str]) -> dict[str, float]:
    """Per condition, the share of its validation images whose nearest prototype is their own condition."""
    totals = confusion.sum(axis=1)
    return {
        name: float(confusion[i, i] / totals[i]) if totals[i] else float("nan")
        for i, name in enumerate(domains)
    }


def _eval_config(target: str, base: Path, model_overlay: Path = MODEL_OVERLAY):  # noqa: ANN202 - a CfgNode
    """A target's config as the demo's experiments.py runs evaluate it (``model_overlay``: the demo model's
    ``--config_overlay``)."""
    from domain_orchestrator.orchestrator import target_config

    return target_config(target, model_weights=base, overlays=[model_overlay], opts=EVAL_OPTS)


def _model_and_library(
    base: Path, library_path: Path, domains: list[str], model_overlay: Path = MODEL_OVERLAY
):  # noqa: ANN202
    """The base model (eval mode, on the CPU) and the library of ``domains`` over it."""
    from cat_seg.checkpoint import load_checkpoint
    from cat_seg.modeling import build_model
    from domain_orchestrator.library import AdapterLibrary

    model = build_model(_eval_config(domains[0], base, model_overlay), "cpu")
    load_checkpoint(model, base)
    model.eval()
    return model, AdapterLibrary.open(library_path, domains, model=model)


def transfer_matrix(
    world: Path,
    base: Path,
    library_path: Path,
    domains: list[str],
    batch_size: int = 32,
    model_overlay: Path = MODEL_OVERLAY,
) -> np.ndarray:
    """(targets, adapters) reported IoU of every adapter alone (weight 1) on every target's validation set.

    Computed as ``experiments.py``'s oracle computes its one adapter (same config, checkpoint, library, fused
    forward, batch size and evaluator), so the diagonal is the oracle column of the results (exactly on
    ``make demo``; this process runs 2 threads and experiments.py's 1, so where a barely trained model has
    near-ties, as in ``--quick``, a pixel can flip).
    """
    from cat_seg.data import get_dataset, load_records, mapper_from_cfg
    from cat_seg.engine.evaluate import label_prediction, reported_metric
    from cat_seg.evaluation import SemSegEvaluator
    from domain_orchestrator.domains import get_domain
    from domain_orchestrator.fusion import fused_text_features
    from domain_orchestrator.step import segment

    model, library = _model_and_library(base, library_path, domains, model_overlay)
    matrix = np.zeros((len(domains), len(domains)))
    with torch.no_grad():
        for i, target in enumerate(domains):
            cfg = _eval_config(target, base, model_overlay)
            spec = get_dataset(get_domain(target).val_dataset)
            mapper = mapper_from_cfg(cfg, is_train=False, num_classes=spec.num_classes)
            inputs = [mapper(r) for r in load_records(spec.name, world)]
            batches = [inputs[k : k + batch_size] for k in range(0, len(inputs), batch_size)]
            for j in range(len(domains)):
                weights = torch.zeros(1, len(domains), dtype=torch.float64)
                weights[0, j] = 1.0
                text = fused_text_features(model, library, weights)[0]
                evaluator = SemSegEvaluator(
                    spec.num_classes,
                    spec.ignore_label,
                    class_names=spec.class_names(),
                    convention=spec.metric_convention,
                )
                for batch in batches:
                    outputs = segment(model, library, batch, weights, text_features=text)
                    for o, x in zip(outputs, batch):
                        evaluator.process(
                            label_prediction(
                                o["sem_seg"], x["sem_seg"], resize_to_label=spec.resize_to is not None
                            ),
                            x["sem_seg"],
                        )
                matrix[i, j] = reported_metric(evaluator.evaluate()["sem_seg"])[1]
    return matrix


def _short(name: str) -> str:
    return name.removeprefix("muses-")


def plot_miou(tables: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(11, 3.4 * len(tables)), squeeze=False)
    colours = {"zeroshot": "#9e9e9e", "uniform": "#64b5f6", "semla": "#e65100", "oracle": "#2e7d32"}
    for ax, (setting, table) in zip(axes[:, 0], tables.items()):
        targets = list(table)
        groups = [*targets, "mean"]
        x = np.arange(len(groups))
        width = 0.2
        for k, method in enumerate(METHODS):
            values = [table[t][method] for t in targets]
            values.append(float(np.mean(values)))
            ax.bar(x + (k - 1.5) * width, values, width, label=METHOD_LABELS[method], color=colours[method])
        ax.set_xticks(x, [_short(g) for g in groups])
        ax.set_ylabel("IoU (%)")
        ax.set_title(f"mIoU per target domain: {setting}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(ncol=4, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _heatmap(fig, ax, matrix: np.ndarray, names: list[str], *, title: str, xlabel: str, ylabel: str,
             fmt: str, vmax: float) -> None:  # noqa: ANN001 - matplotlib figure and axes  # fmt: skip
    """A heatmap on ``ax`` with its values written in the cells and a colour bar."""
    image = ax.imshow(matrix, vmin=0, vmax=vmax, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < 0.5 * vmax else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046)


def plot_weights(matrices: Mapping[str, np.ndarray], domains: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(6.2 * len(matrices), 5.4), squeeze=False)
    names = [_short(d) for d in domains]
    for ax, (setting, matrix) in zip(axes[0], matrices.items()):
        _heatmap(fig, ax, matrix, names, title=f"mean SemLA weight: {setting}", xlabel="source adapter",
                 ylabel="target domain", fmt=".2f", vmax=1.0)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_matrix(
    matrix: np.ndarray,
    domains: list[str],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    fmt: str,
    vmax: float | None = None,
) -> Path:
    """One heatmap with its values written in the cells (rows: conditions, columns: adapters/prototypes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 5.6))
    top = float(matrix.max()) if vmax is None else vmax
    _heatmap(fig, ax, matrix, [_short(d) for d in domains], title=title, xlabel=xlabel, ylabel=ylabel,
             fmt=fmt, vmax=top)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def example_predictions(
    world: Path,
    base: Path,
    library_path: Path,
    clip: Path,
    leave_one_out: Path,
    domains: list[str],
    targets: tuple[str, ...],
    model_overlay: Path = MODEL_OVERLAY,
) -> list[dict]:
    """For the first validation image of each target: the image, its label and three predictions.

    The predictions are computed the way ``experiments.py`` computes them (the same config, checkpoint,
    library and fused forward), with the weights its leave-one-out run recorded for the image.
    """
    from cat_seg.data import load_records, mapper_from_cfg
    from cat_seg.engine.evaluate import label_prediction
    from domain_orchestrator.domains import get_domain
    from domain_orchestrator.retrieval import uniform_weights
    from domain_orchestrator.step import segment

    semla = _read(leave_one_out / "semla" / "weights.json")
    model, library = _model_and_library(base, library_path, domains, model_overlay)
    examples = []
    with torch.no_grad():
        for target in targets:
            cfg = _eval_config(target, base, model_overlay)
            record = load_records(get_domain(target).val_dataset, world)[0]
            x = mapper_from_cfg(cfg, is_train=False)(record)
            image = np.asarray(x["image"].permute(1, 2, 0))
            key = Path(record["file_name"]).relative_to(world).as_posix()
            entry = semla[target][key]
            w_semla = torch.zeros(1, len(domains), dtype=torch.float64)
            for name, w in zip(entry["adapters"], entry["weights"]):
                w_semla[0, domains.index(name)] = w
            w_uniform = uniform_weights(len(domains), exclude=[domains.index(target)])
            preds = {
                method: segment(model, library, [x], w)[0]["sem_seg"]
                for method, w in (("zeroshot", None), ("uniform", w_uniform), ("semla", w_semla))
            }
            examples.append(
                {
                    "target": target,
                    "image": image,
                    "label": np.asarray(x["sem_seg"]),
                    **{
                        m: np.asarray(label_prediction(p, x["sem_seg"], resize_to_label=False))
                        for m, p in preds.items()
                    },
                    "weights": dict(zip(entry["adapters"], entry["weights"])),
                }
            )
    return examples


def plot_examples(examples: list[dict], path: Path, scale: int = 3) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = cityscapes_palette()
    columns = [("image", "image"), ("label", "ground truth"), ("zeroshot", "zero-shot"),
               ("uniform", "uniform (leave-one-out)"), ("semla", "SemLA (leave-one-out)")]  # fmt: skip
    fig, axes = plt.subplots(
        len(examples), len(columns), figsize=(2.6 * len(columns), 2.75 * len(examples)), squeeze=False
    )
    for row, example in zip(axes, examples):
        for ax, (key, title) in zip(row, columns):
            picture = (
                example[key] if key == "image" else palette[np.asarray(example[key], dtype=np.int64) % 256]
            )
            ax.imshow(np.kron(picture, np.ones((scale, scale, 1), dtype=np.uint8)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if key == "image":
                ax.set_ylabel(_short(example["target"]), fontsize=10)
            ax.set_title(title, fontsize=9)
        top = sorted(example["weights"].items(), key=lambda kv: -kv[1])[:2]
        row[-1].set_xlabel(", ".join(f"{_short(n)} {w:.2f}" for n, w in top), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_tables(
    tables: Mapping[str, Mapping[str, Mapping[str, float]]],
    confusion: np.ndarray,
    transfer: np.ndarray,
    domains: list[str],
) -> str:
    lines = []
    for setting, table in tables.items():
        lines.append(f"IoU (%) per target, {setting}:")
        header = f"  {'target':<14}" + "".join(f"{METHOD_LABELS[m]:>11}" for m in METHODS)
        lines += [header, "  " + "-" * (len(header) - 2)]
        for target, row in table.items():
            lines.append(f"  {_short(target):<14}" + "".join(f"{row[m]:>11.2f}" for m in METHODS))
        means = [float(np.mean([row[m] for row in table.values()])) for m in METHODS]
        lines.append(f"  {'mean':<14}" + "".join(f"{v:>11.2f}" for v in means))
        lines.append("")
    accuracy = retrieval_accuracy(confusion, domains)
    names = [_short(d) for d in domains]
    lines.append(
        "retrieval accuracy of the embedder (validation images whose nearest prototype is their condition):"
    )
    lines.append("  " + ", ".join(f"{_short(d)} {a:.2f}" for d, a in accuracy.items()))
    lines.append(f"  mean {float(np.mean(list(accuracy.values()))):.2f}")
    lines.append("")
    lines.append("nearest prototype (columns) of each condition's validation images (rows):")
    lines += _matrix_lines(confusion, names, "{:d}")
    lines.append("")
    lines.append(
        "transfer: IoU (%) of each adapter alone (columns) on each target (rows); the diagonal is the oracle:"
    )
    lines += _matrix_lines(transfer, names, "{:.1f}")
    return "\n".join(lines)


def _matrix_lines(matrix: np.ndarray, names: list[str], fmt: str) -> list[str]:
    width = max(7, *(len(n) + 1 for n in names))
    lines = [f"  {'':<12}" + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(f"  {name:<12}" + "".join(f"{fmt.format(v):>{width}}" for v in row))
    return lines


def report(
    output: Path,
    *,
    world: Path,
    clip: Path,
    base: Path,
    library: Path,
    results: Mapping[str, Path],
    seed: int,
    model_overlay: Path = MODEL_OVERLAY,
) -> dict:
    """Write ``summary.txt`` (and ``summary.json``) and the pictures into ``output``; returns the numbers.

    ``model_overlay`` is the demo model's ``experiments.py --config_overlay`` (``configs/demo/model.yaml``
    for CAT-Seg, ``configs/demo/san_model.yaml`` for SAN): the transfer matrix and the example predictions
    are computed with it, as ``experiments.py`` computed the results."""
    domains = [
        line[2:].strip()
        for line in (output / "domains.yaml").read_text().splitlines()
        if line.startswith("- ")
    ]
    # The later settings hold only the methods that depend on the setting (uniform, SemLA).
    first = next(iter(results.values()))
    tables = {setting: results_table(first, folder) for setting, folder in results.items()}
    confusion = retrieval_confusion(world, clip, library, domains)
    transfer = transfer_matrix(world, base, library, domains, model_overlay=model_overlay)
    matrices = {setting: mean_weights(folder, domains) for setting, folder in results.items()}
    pictures = [
        plot_miou(tables, output / "miou.png"),
        plot_weights(matrices, domains, output / "semla_weights.png"),
        plot_matrix(
            confusion / confusion.sum(axis=1, keepdims=True).clip(min=1),
            domains,
            output / "retrieval.png",
            title="retrieval: share of each condition's images",
            xlabel="nearest prototype",
            ylabel="condition of the image",
            fmt=".2f",
            vmax=1.0,
        ),
        plot_matrix(
            transfer,
            domains,
            output / "transfer.png",
            title="IoU (%) of each adapter alone",
            xlabel="adapter",
            ylabel="target domain",
            fmt=".1f",
        ),
    ]
    leave_one_out = list(results.values())[-1]
    targets = tuple(t for t in EXAMPLE_TARGETS if t in domains) or tuple(domains[:4])
    examples = example_predictions(
        world, base, library, clip, leave_one_out, domains, targets, model_overlay=model_overlay
    )
    pictures.append(plot_examples(examples, output / "examples.png"))
    text = format_tables(tables, confusion, transfer, domains)
    (output / "summary.txt").write_text(text + "\n", encoding="utf-8")
    accuracy = retrieval_accuracy(confusion, domains)
    numbers = {
        "seed": seed,
        "domains": domains,
        "tables": tables,
        "retrieval_accuracy": accuracy,
        "retrieval_confusion": confusion.tolist(),
        "transfer": transfer.tolist(),
    }
    (output / "summary.json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    return {"tables": tables, "accuracy": accuracy, "pictures": pictures, "text": text, "seed": seed,
            "confusion": confusion, "transfer": transfer}  # fmt: skip


def format_seeds(results: Mapping[int, Mapping]) -> tuple[str, dict]:
    """Each seed's mean IoU per method and setting, their mean +- std, the base model's IoU on its own
    condition and the retrieval accuracy; whether the paper's ordering holds on every seed."""
    seeds = list(results)
    settings = list(next(iter(results.values()))["tables"])
    numbers: dict = {"seeds": seeds, "settings": {}}
    lines = []
    for setting in settings:
        means = {
            seed: {
                m: float(np.mean([row[m] for row in results[seed]["tables"][setting].values()]))
                for m in METHODS
            }
            for seed in seeds
        }
        numbers["settings"][setting] = means
        lines.append(f"mean IoU (%) over the targets, {setting}:")
        header = f"  {'seed':<14}" + "".join(f"{METHOD_LABELS[m]:>14}" for m in METHODS) + "   ordering"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for seed in seeds:
            row = means[seed]
            ordered = all(row[a] < row[b] for a, b in zip(METHODS, METHODS[1:]))
            lines.append(
                f"  {seed:<14}"
                + "".join(f"{row[m]:>14.2f}" for m in METHODS)
                + f"   {'holds' if ordered else 'broken'}"
            )
        stats = [
            (np.mean([means[s][m] for s in seeds]), np.std([means[s][m] for s in seeds])) for m in METHODS
        ]
        lines.append(f"  {'mean +- std':<14}" + "".join(f"{f'{a:.2f} +- {b:.2f}':>14}" for a, b in stats))
        lines.append("")
    base = BASE_TARGET
    lines.append(f"base model on its own condition ({_short(base)}), zero-shot IoU (%): "
                 + ", ".join(f"seed {s} {results[s]['tables'][settings[0]][base]['zeroshot']:.2f}" for s in seeds))  # fmt: skip
    lines.append(
        "retrieval accuracy (mean over conditions): "
        + ", ".join(f"seed {s} {np.mean(list(results[s]['accuracy'].values())):.2f}" for s in seeds)
    )
    return "\n".join(lines), numbers
