"""The four experiments of SemLA's main table: ``zeroshot``, ``oracle``, ``uniform`` and ``semla``.

For every target domain, each requested experiment predicts the target's validation images with the
CAT-Seg base model plus a weighted combination of library adapters, and is scored with the target's
metric (cityscapesScripts ``IoU`` for ACDC, MUSES and Cityscapes; ``mIoU`` otherwise):

- ``zeroshot``: the base model alone;
- ``oracle``: the target's own adapter alone (weight 1);
- ``uniform``: every source adapter at 1/N (without the target's with ``--remove_target_adapter``);
- ``semla``: per image, the image's CLIP embedding is scored against each source domain's prototype
  (the mean embedding of its training images), the ``top_k`` closest are kept and weighted by
  softmax(score / temperature) (:mod:`domain_orchestrator.retrieval`).

Everything runs through :func:`domain_orchestrator.fusion.fused_adapters`: one base model, the adapters
stacked once, a weight vector per image, no PEFT module surgery. The model, the library, the data of a
target and its images' embeddings are loaded once and shared by all experiments: each batch of images
is read once and predicted by every experiment in turn.

Flow: :func:`prepare` (:mod:`.plan`) checks everything that can be checked without building the model and
reports all problems together; :func:`run` (:mod:`.loop`, in every process of a distributed run) builds
the model, opens and validates the library, the embedder and the prototypes (again reporting every
problem together), then evaluates target after target; the per-image step is :mod:`.step`. Progress inside a target is saved every ``save_every`` seconds and when
the run is interrupted, so ``resume`` continues where it stopped (the final numbers equal those of an
uninterrupted run: the same batches are formed). Under ``torch.distributed`` each process evaluates a
contiguous shard of every target's images; confusion matrices are summed and weights gathered, so the
outputs equal a one-process run.

Class-text features under fusion (``text_features``): ``per_image`` (default) encodes the class prompts
under each image's own fused adapters, what the method means; ``reference`` reproduces the original
code, which encoded them once per target under the adapters of the target's first image and reused
them for every other image.
"""

from __future__ import annotations

from .loop import Session, run
from .plan import ExperimentPlan, TargetPlan, architecture_key, prepare, target_config
from .settings import (
    EXPERIMENT_OPTS,
    EXPERIMENTS,
    TEXT_POLICIES,
    ExperimentError,
    ExperimentSettings,
    SemlaConfig,
    load_semla_config,
)

__all__ = [
    "EXPERIMENTS",
    "EXPERIMENT_OPTS",
    "TEXT_POLICIES",
    "ExperimentError",
    "ExperimentPlan",
    "ExperimentSettings",
    "SemlaConfig",
    "Session",
    "TargetPlan",
    "architecture_key",
    "load_semla_config",
    "prepare",
    "run",
    "target_config",
]
