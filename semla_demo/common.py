"""What the demo's modules share: the demo's files, how it evaluates, and the methods it compares.

``make demo``'s pipeline and report, ``demo.py`` and the web demo read these. Importing this module costs
nothing (``pathlib`` and ``dataclasses`` only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: What ``make demo`` writes: ``base/model_final.pth``, the library ``loradb/``, the CLIP ``clip/``, the
#: ``world/`` and the results.
DEMO = REPO_ROOT / "demo_output"
#: The demo's CAT-Seg config (the ``tiny-64`` model): the base training's and the demo tools' default.
TRAIN_CONFIG = REPO_ROOT / "configs" / "demo" / "train.yaml"
#: The model overlay of the demo's ``experiments.py`` runs (and of the report's evaluations).
MODEL_OVERLAY = REPO_ROOT / "configs" / "demo" / "model.yaml"
#: The demo's SAN (``python -m semla_demo --model san``): its training config and its model overlay.
SAN_TRAIN_CONFIG = REPO_ROOT / "configs" / "demo" / "san_train.yaml"
SAN_MODEL_OVERLAY = REPO_ROOT / "configs" / "demo" / "san_model.yaml"
#: The demo's SemLA retrieval settings (distance measure, temperature, top-k).
SEMLA_CONFIG = REPO_ROOT / "configs" / "demo" / "semla_config.yaml"
#: Overrides of every evaluation of the demo (experiments.py and the report): the 64x64 images fit the
#: model's input whole, one view instead of the five of the sliding window that experiments.py's
#: configs otherwise switch on (as the original's experiments do).
EVAL_OPTS = ("TEST.SLIDING_WINDOW", "False")

#: The methods the demo compares (``experiments.py --experiment`` names), in the order of its tables and
#: figures. A single image (``semla_demo.inference``, the web page) uses the first three.
METHODS = ("zeroshot", "uniform", "semla", "oracle")
#: How tables, figures and the web page name each method.
METHOD_LABELS = {"zeroshot": "zero-shot", "uniform": "uniform", "semla": "SemLA", "oracle": "oracle"}


@dataclass(frozen=True)
class DemoModel:
    """A model family the demo can run (``python -m semla_demo --model NAME``).

    Attributes:
        name: the ``--model`` value.
        train_config: the base training's and the adapters' config (``run.sh`` / ``run_lora.sh``).
        model_overlay: ``experiments.py``'s ``--config_overlay`` (and the report's evaluations).
        output: the default output folder.
        lora_lr: the adapters' learning rate (``SOLVER.BASE_LR`` of ``run_lora.sh``; SAN's too: 0.005 and 0.03
            gave it a lower oracle and leave-one-out SemLA on seed 0, docs/demo.md).
    """

    name: str
    train_config: Path
    model_overlay: Path
    output: Path
    lora_lr: float


#: ``--model`` -> the demo's model; ``catseg`` is the default (``make demo``).
DEMO_MODELS = {
    "catseg": DemoModel("catseg", TRAIN_CONFIG, MODEL_OVERLAY, DEMO, lora_lr=0.015),
    "san": DemoModel("san", SAN_TRAIN_CONFIG, SAN_MODEL_OVERLAY, DEMO / "san", lora_lr=0.015),
}


def demo_for(path: str | Path) -> DemoModel | None:
    """The demo model whose default output folder holds ``path`` (``demo_output/san/...``: SAN's;
    elsewhere in ``demo_output/``: CAT-Seg's), or None: which ``make demo`` command would build it."""
    resolved = Path(path).resolve()
    for model in sorted(DEMO_MODELS.values(), key=lambda m: -len(m.output.parts)):  # the deepest first
        if resolved.is_relative_to(model.output):
            return model
    return None


def make_demo_command(model: DemoModel) -> str:
    """``make demo``, with ``DEMO_ARGS="--model NAME"`` for a model other than CAT-Seg."""
    return "make demo" if model.name == "catseg" else f'make demo DEMO_ARGS="--model {model.name}"'
