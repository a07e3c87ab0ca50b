"""Compare this project's SAN with the original SAN code's outputs on identical random weights.

``original_side.py`` (run in the original's environment, see README.md here) writes, for one preset, the
original model's state dict, the inputs, its eval-mode semantic maps and its training losses on one batch
(torch seeded right before the training forward). This script loads that state dict strictly into our SAN
(``catseg/configs/san/san_vitb16.yaml`` or ``san_vitl14_336.yaml``, through ``MODEL.WEIGHTS``' loader), runs
the same inputs and prints the largest differences; it exits non-zero when a float32 semantic map differs
by more than ``--atol`` (1e-5) times max(1, the map's largest value), the float64 maps (when the original
side wrote them) by more than 1e-9, or a loss term by more than ``--loss-rtol`` (relative, 1e-5).

Usage (from the repository root, in the project's environment)::

    python tools/san_parity/compare.py /tmp/san_parity/b16 [--atol 1e-5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"b16": "configs/san/san_vitb16.yaml", "l14": "configs/san/san_vitl14_336.yaml"}


def _load(path: Path):  # noqa: ANN202 - torch objects
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing (run original_side.py first)")
    return torch.load(path, map_location="cpu", weights_only=False)


def build_our_model(preset: str, state_dict: dict[str, torch.Tensor], vocabulary: list[str]):  # noqa: ANN201
    """Our SAN for ``preset`` holding ``state_dict`` (loaded strictly: no missing or unexpected key)."""
    from cat_seg.checkpoint import load_checkpoint
    from cat_seg.config import load_config, resolve_catseg_path
    from cat_seg.modeling import build_model

    opts = []
    if "criterion.empty_weight" in state_dict:
        # The criterion's class weights are sized by MODEL.SAN.NUM_CLASSES (171 in the released models).
        opts = ["MODEL.SAN.NUM_CLASSES", str(state_dict["criterion.empty_weight"].numel() - 1)]
    cfg = load_config(resolve_catseg_path(CONFIGS[preset]), opts)
    model = build_model(cfg, "cpu", class_names=False)
    model.set_class_names(train=vocabulary, test=vocabulary)
    # Through the MODEL.WEIGHTS path: a detectron2-style {"model": state_dict} file, loaded strictly.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "san_checkpoint.pth"
        torch.save({"model": state_dict, "iteration": 0}, path)
        load_checkpoint(model, path, strict=True)
    return model


def compare(folder: Path, *, atol: float, loss_rtol: float) -> dict:
    """Run our SAN on the original's inputs; return the differences (see the module docstring)."""
    meta = json.loads((folder / "meta.json").read_text())
    preset = meta["preset"]
    state_dict = _load(folder / "state_dict.pt")
    inputs = _load(folder / "inputs.pt")
    vocabulary = list(inputs["vocabulary"])
    model = build_our_model(preset, state_dict, vocabulary)
    ours_keys = list(model.state_dict())
    report: dict = {
        "preset": preset,
        "original": meta,
        "keys": {
            "original": len(state_dict),
            "ours": len(ours_keys),
            "same_set": set(ours_keys) == set(state_dict),
        },
    }

    # Eval: the whole inference path (normalise, pad, CLIP at the scaled size, side adapter, recognition,
    # classifier, upsampling, crop and resize to the requested size, semantic combination).
    expected = _load(folder / "eval_out.pt")
    batch = [
        {"image": image, "height": int(h), "width": int(w)}
        for image, h, w in zip(inputs["images"], inputs["heights"], inputs["widths"])
    ]
    model.eval()
    with torch.no_grad():
        got = [out["sem_seg"] for out in model(batch)]
    eval_diffs = []
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape:
            raise SystemExit(
                f"error: image {i}: our sem_seg has shape {tuple(g.shape)}, the original's {tuple(e.shape)}"
            )
        eval_diffs.append(
            {
                "shape": list(g.shape),
                "max_abs_diff": float((g - e).abs().max()),
                "max_value": float(e.abs().max()),
                "argmax_agreement": float((g.argmax(0) == e.argmax(0)).float().mean()),
            }
        )
    report["eval"] = eval_diffs

    # The same in float64 on both sides: what remains is the implementations' difference, not rounding.
    expected64_file = folder / "eval_out_float64.pt"
    if expected64_file.is_file():
        expected64 = _load(expected64_file)
        model64 = copy.deepcopy(model).double()
        batch64 = [dict(item, image=item["image"].double()) for item in batch]
        with torch.no_grad():
            got64 = [out["sem_seg"] for out in model64(batch64)]
        report["eval_float64"] = [float((g - e).abs().max()) for g, e in zip(got64, expected64)]
        del model64

    # Training: the loss terms on one batch, with the torch RNG seeded as the original side seeded it, so
    # that the matcher's and the mask losses' random points are the same draws.
    train_file = folder / "train_out.pt"
    if train_file.is_file():
        expected_losses = _load(train_file)
        model.train()
        train_batch = [
            {"image": image, "sem_seg": sem} for image, sem in zip(inputs["images"], inputs["sem_seg"])
        ]
        torch.manual_seed(int(meta.get("train_seed", int(meta.get("seed", 0)) + 1)))
        with torch.no_grad():
            losses = {k: float(v) for k, v in model(train_batch).items()}
        terms = {}
        for name in sorted(set(losses) | set(expected_losses)):
            ours, theirs = losses.get(name), expected_losses.get(name)
            entry = {"ours": ours, "original": None if theirs is None else float(theirs)}
            if ours is not None and theirs is not None:
                entry["rel_diff"] = abs(ours - float(theirs)) / max(abs(float(theirs)), 1e-12)
            terms[name] = entry
        report["train"] = terms

    # The maps are sums over the queries of probability products (values up to ~10 on random weights):
    # float32 is held to atol per unit of the map's largest value, float64 to 1e-9.
    failures = [
        f"eval image {i}: max |diff| {d['max_abs_diff']:.3g} > {atol} x max(1, {d['max_value']:.3g})"
        for i, d in enumerate(eval_diffs)
        if d["max_abs_diff"] > atol * max(1.0, d["max_value"])
    ]
    failures += [
        f"eval image {i} in float64: max |diff| {diff:.3g} > 1e-9"
        for i, diff in enumerate(report.get("eval_float64", []))
        if diff > 1e-9
    ]
    for name, entry in report.get("train", {}).items():
        if "rel_diff" not in entry:
            failures.append(f"loss {name}: only in {'ours' if entry['ours'] is not None else 'the original'}")
        elif entry["rel_diff"] > loss_rtol:
            failures.append(f"loss {name}: relative diff {entry['rel_diff']:.3g} > {loss_rtol}")
    if not report["keys"]["same_set"]:
        failures.append("state dict key sets differ")
    report["failures"] = failures
    return report


def _print(report: dict) -> None:
    print(
        f"SAN parity, preset {report['preset']} (original: {report['original'].get('san_commit', '?')}, "
        f"open_clip {report['original'].get('open_clip', '?')}, timm {report['original'].get('timm', '?')})"
    )
    print(
        f"  state dict: {report['keys']['original']} tensors, loaded strictly; same key set: {report['keys']['same_set']}"
    )
    for i, d in enumerate(report["eval"]):
        print(
            f"  eval image {i}: sem_seg {tuple(d['shape'])}, max |ours - original| = {d['max_abs_diff']:.2e} "
            f"(values up to {d['max_value']:.3g}), argmax agreement {100 * d['argmax_agreement']:.2f} %"
        )
    for i, diff in enumerate(report.get("eval_float64", [])):
        print(f"  eval image {i} in float64 on both sides: max |ours - original| = {diff:.2e}")
    for name, entry in report.get("train", {}).items():
        rel = entry.get("rel_diff")
        print(
            f"  {name:12s} ours {entry['ours']!s:>22} original {entry['original']!s:>22} rel diff {rel if rel is None else f'{rel:.1e}'}"
        )
    print("  PASS" if not report["failures"] else "  FAIL: " + "; ".join(report["failures"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the output folder of original_side.py")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="largest allowed |diff| of the float32 semantic maps per unit of their largest value (default: 1e-5)",
    )
    parser.add_argument(
        "--loss-rtol",
        type=float,
        default=1e-5,
        help="largest allowed relative diff of a loss term (default: 1e-5)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT / "catseg"))
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    report = compare(args.folder, atol=args.atol, loss_rtol=args.loss_rtol)
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
