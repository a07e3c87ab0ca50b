"""What the demo's modules share: the demo's files, how it evaluates, and the methods it compares.

``make demo``'s pipeline and report, ``demo.py`` and the web demo read these. Importing this module costs
nothing (``pathlib`` only).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: What ``make demo`` writes: ``base/model_final.pth``, the library ``loradb/``, the CLIP ``clip/``, the
#: ``world/`` and the results.
DEMO = REPO_ROOT / "demo_output"
#: The demo's CAT-Seg config (the ``tiny-64`` model): the base training's and the demo tools' default.
TRAIN_CONFIG = REPO_ROOT / "configs" / "demo" / "train.yaml"
#: The model overlay of the demo's ``experiments.py`` runs (and of the report's evaluations).
MODEL_OVERLAY = REPO_ROOT / "configs" / "demo" / "model.yaml"
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
