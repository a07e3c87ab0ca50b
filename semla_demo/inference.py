"""Segment single images with CAT-Seg, your class names, and optionally SemLA's retrieved adapters.

:class:`Segmenter` is what ``demo.py`` and the web demo use: the library's own pieces (the test mapper,
``AdapterLibrary``, ``semla_weights``, ``fused_text_features``, ``fused_adapters``, the embedder), in the
order ``experiments.py`` applies them to one image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .common import METHODS as DEMO_METHODS

logger = logging.getLogger(__name__)

Method = Literal["zeroshot", "uniform", "semla"]
#: What one image can be segmented with: the demo's methods but the oracle (an image has no known domain).
METHODS: tuple[str, ...] = tuple(m for m in DEMO_METHODS if m != "oracle")


@dataclass
class Prediction:
    """One image's segmentation.

    Attributes:
        image: (H, W, 3) uint8, the image as read.
        labels: (H, W) int64 class ids (indices into ``class_names``).
        class_names: the vocabulary.
        method: ``zeroshot``, ``uniform`` or ``semla``.
        weights: adapter -> weight of the adapters used (non-zero only), best first; empty for zero-shot.
    """

    image: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    method: str
    weights: dict[str, float] = field(default_factory=dict)


class Segmenter:
    """CAT-Seg ready to segment single images, with SemLA when given a library and an embedder.

    Args:
        model: a ``CATSeg`` with its weights loaded (eval mode is set here).
        cfg: the config it was built from (for the test resize: ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``;
            test-time augmentation: ``TEST.AUG.*``).
        library: adapters to fuse (``uniform`` and ``semla``).
        embedder: the retrieval embedder (``semla``).
        prototypes: (N, D) prototypes of the library's adapters, in library order (``semla``).
        measure, top_k, temperature: SemLA's retrieval settings.
        combination_type, merge: how ``uniform`` and ``semla`` fuse the adapters (PEFT's combination type
            and its options; ``cat`` is the exact weighted sum).
    """

    def __init__(
        self,
        model: Any,
        cfg: Any,
        *,
        library: Any = None,
        embedder: Any = None,
        prototypes: torch.Tensor | None = None,
        measure: str = "euclidean",
        top_k: int = 5,
        temperature: float = 0.05,
        combination_type: str = "cat",
        merge: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        from cat_seg.data import mapper_from_cfg
        from cat_seg.test_time_augmentation import TTASettings

        self.model = model.eval()
        self.mapper = mapper_from_cfg(cfg, is_train=False)
        self.library = library
        self.embedder = embedder
        self.prototypes = prototypes
        self.measure = measure
        self.top_k = top_k
        self.temperature = temperature
        self.combination_type = combination_type
        self.merge = merge
        self.tta = TTASettings.from_cfg(cfg)  # TEST.AUG.ENABLED (demo.py --tta): test-time views
        self._text: torch.Tensor | None = None

    @classmethod
    def from_files(
        cls,
        config_file: str | os.PathLike,
        weights: str | os.PathLike,
        *,
        opts: Sequence[str] = (),
        device: str = "cpu",
        lora_library_path: str | os.PathLike | None = None,
        embedding_model: str | None = None,
        semla_config: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
    ) -> Segmenter:
        """Build from files: the config, the checkpoint and, for SemLA, the library and the embedder.

        ``class_names`` is the vocabulary (default: the config's class files); given, the config needs no
        class files (e.g. the model overlay ``configs/demo/san_model.yaml`` alone).

        Raises:
            FileNotFoundError, ValueError: a missing or unusable file, named in the message (every problem
                of the library, statistics and embedder together).
        """
        from cat_seg.checkpoint import load_checkpoint
        from cat_seg.config import load_config
        from cat_seg.modeling import build_model
        from domain_orchestrator.orchestrator import ExperimentError, load_semla_config

        cfg = load_config(config_file, list(opts))
        if not Path(weights).is_file():
            raise FileNotFoundError(f"CAT-Seg checkpoint {weights} not found")
        model = build_model(cfg, device, class_names=class_names is None)
        load_checkpoint(model, weights)
        if class_names is not None:
            names = [n.strip() for n in class_names if n.strip()]
            if not names:
                raise ValueError("the class list is empty: give at least one class name")
            model.set_class_names(train=names, test=names)
        semla = load_semla_config(semla_config)
        if lora_library_path is None:
            if embedding_model is not None:
                raise ValueError(
                    "--embedding_model needs --lora_library_path (the adapters to retrieve from)"
                )
            return cls(model, cfg)
        from domain_orchestrator.library import AdapterLibrary
        from domain_orchestrator.prototypes import load_prototypes

        library = AdapterLibrary.open(lora_library_path, model=model, device=device)
        embedder, prototypes = None, None
        if embedding_model is not None:
            from domain_orchestrator.embedding import load_embedder

            embedder = load_embedder(embedding_model, device=device, catseg_model=model)
            found = load_prototypes(lora_library_path, library.names, embedder.identity, spec=embedding_model)
            if found.problems:
                raise ExperimentError(found.problems)
            prototypes = torch.from_numpy(found.vectors)
        return cls(
            model,
            cfg,
            library=library,
            embedder=embedder,
            prototypes=prototypes,
            measure=semla.measure,
            top_k=semla.top_k,
            temperature=semla.temperature,
            combination_type=semla.combination_type,
            merge=semla.merge,
        )

    # -- vocabulary ----------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.model.test_class_names)

    def set_classes(self, class_names: Sequence[str]) -> None:
        """Use another vocabulary (open-vocabulary: any names; the first synonym of "a, b" is prompted)."""
        names = [n.strip() for n in class_names if n.strip()]
        if not names:
            raise ValueError("the class list is empty: give at least one class name")
        if names != self.class_names:
            self.model.set_class_names(test=names)
            self._text = None

    # -- weights ---------------------------------------------------------------------------------------------
    def weights(
        self,
        image_path: str | os.PathLike,
        method: str,
        *,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor | None:
        """(1, N) adapter weights of an image for ``method`` (None for zero-shot)."""
        from domain_orchestrator.retrieval import uniform_weights
        from domain_orchestrator.settings import SemlaConfig
        from domain_orchestrator.step import retrieve

        if method == "zeroshot":
            return None
        if self.library is None:
            raise ValueError(f"{method} needs an adapter library (--lora_library_path)")
        if method == "uniform":
            return uniform_weights(len(self.library))
        if method != "semla":
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if self.embedder is None or self.prototypes is None:
            raise ValueError(
                "semla needs an embedding model (--embedding_model) and the library's statistics"
            )
        embedding = torch.from_numpy(self.embedder.embed_files([image_path], batch_size=1, progress=False))
        semla = SemlaConfig(measure=self.measure, temperature=self.temperature, top_k=self.top_k)
        return retrieve(embedding, self.prototypes, semla, top_k=top_k or None, temperature=temperature)

    def combination(self, combination_type: str | None = None) -> Any:
        """The merge of ``combination_type`` (default: the config's), or None for ``cat``."""
        from domain_orchestrator.settings import COMBINATION_TYPES, SemlaConfig

        kind = combination_type or self.combination_type
        if kind not in COMBINATION_TYPES:
            raise ValueError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}, got {kind!r}")
        merge = dict(self.merge) if kind == self.combination_type else {}
        if kind.startswith(("ties", "dare", "magnitude_prune")):
            merge.setdefault("density", 0.5)
        return SemlaConfig(combination_type=kind, merge=tuple(merge.items())).combination()

    # -- prediction -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        image_path: str | os.PathLike,
        method: str = "semla",
        *,
        top_k: int | None = None,
        temperature: float | None = None,
        combination_type: str | None = None,
    ) -> Prediction:
        """Segment one image file at its own size with the current vocabulary.

        ``combination_type`` overrides the config's fusion for this image (the config's options apply when
        it is the config's type; a pruning type chosen here keeps half the values, density 0.5).
        """
        from domain_orchestrator.merging import merged_library
        from domain_orchestrator.step import kept_adapters, segment

        x = self.mapper({"file_name": str(image_path)})
        w = self.weights(image_path, method, top_k=top_k, temperature=temperature)  # retrieve
        if w is None and self._text is None:
            self._text = self.model.text_features()  # the zero-shot class features, kept
        library, fused = self.library, w
        spec = self.combination(combination_type) if w is not None else None
        if spec is not None:  # PEFT's other combination types: this image's merged adapter
            library, fused = merged_library(self.library, w, spec), torch.eye(1, dtype=torch.float64)
        text = self._text if w is None else None
        probs = segment(self.model, library, [x], fused, text_features=text, tta=self.tta)[0]
        probs = probs["sem_seg"]  # fused and predicted
        used = dict(kept_adapters(w[0], self.library.names)) if w is not None else {}
        from cat_seg.data import read_image

        return Prediction(
            image=read_image(image_path),
            labels=probs.argmax(dim=0).cpu().numpy(),
            class_names=self.class_names,
            method=method,
            weights=used,
        )
