"""What the rest of the code uses from a segmentation model: the :class:`SegmentationModel` protocol.

:func:`cat_seg.modeling.build_model` returns a model of the family that ``MODEL.META_ARCHITECTURE`` names
(:mod:`.registry`). The training and evaluation engine (``cat_seg.engine``), the LoRA code
(``cat_seg.lora``, ``cat_seg.engine.lora``), the orchestrator (``domain_orchestrator``: fusion, adapter
library, CAT-Seg embedder, experiments), the demos (``semla_demo``, ``demo.py``) and the benchmarks
(``bench/``) use a built model only through the members below, so a second model family (e.g. SAN) that
provides them works with all of them. ``docs/model_interface.md`` says the same for readers of the docs.

The model must also be a ``torch.nn.Module``: LoRA adapters, adapter fusion and checkpoints address its
``nn.Linear`` layers and tensors by module path (the members of ``nn.Module`` the code relies on are
listed in the protocol too). CAT-Seg (:class:`cat_seg.modeling.CATSeg`) and SAN
(:class:`cat_seg.modeling.SAN`) implement this protocol.

Optional members, used when present:

- ``lora_target_modules()``: SemLA's LoRA targets of the model (``cat_seg.lora.semla_target_modules``, the
  targets when ``MODEL.LORA.MODUELS`` is empty). SAN has it. Without it the CAT-Seg selection is used,
  read from ``sem_seg_head.predictor`` (the depths of its CLIP towers and aggregator).
- ``guidance_layers`` and the settable ``train_guidance_layers`` (CAT-Seg): the CLIP blocks feeding the
  decoder guidance and their training-mode override; ``MODEL.LORA.REFERENCE_TRAINING`` (the original CAT-Seg
  SemLA trainer, docs/differences.md#q2) needs them and is refused for a model without them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from .clip import CLIP

__all__ = ["SegmentationModel"]


@runtime_checkable
class SegmentationModel(Protocol):
    """An open-vocabulary semantic-segmentation model, as the engine, the LoRA code, the orchestrator and
    the demos use it.

    ``isinstance(model, SegmentationModel)`` checks that every member exists (not their signatures).
    """

    # -- vocabulary and text ---------------------------------------------------------------------------
    @property
    def train_class_names(self) -> list[str]:
        """The training vocabulary; index = output channel = train id.

        Used by the engine (``cat_seg.engine.run``: the number of classes of the training mapper).
        """
        ...

    @property
    def test_class_names(self) -> list[str]:
        """The evaluation vocabulary; index = output channel of eval-mode predictions.

        Used by the engine (``check_vocabulary`` before evaluating a dataset) and the demos
        (``semla_demo.inference.Segmenter.class_names``, the labels of a prediction).
        """
        ...

    @property
    def class_tokens(self) -> Tensor:
        """(T, P, L) prompt tokens of the current mode's vocabulary (train mode: the training classes,
        eval mode: the test classes); T classes, P prompt templates, L the text context length.

        Used by ``domain_orchestrator.fusion.fused_text_features``, which repeats them once per image and
        encodes them with :meth:`text_features` under each image's fused adapters.
        """
        ...

    def set_class_names(
        self, *, train: Sequence[str] | None = None, test: Sequence[str] | None = None
    ) -> None:
        """Replace the training and/or evaluation vocabulary (``None`` keeps it) and tokenise its prompts.

        Must not encode text (that is :meth:`text_features`), so it is cheap. Used by ``build_model`` (the
        config's class JSONs), the orchestrator (each target's classes), the demos (a vocabulary typed by
        the user) and the benchmarks.
        """
        ...

    def text_features(self, tokens: Tensor | None = None) -> Tensor:
        """Encode class prompts with the model's text tower: (T, P, L) tokens -> (T, P, C) features, as
        :meth:`__call__` takes them. ``tokens=None``: the current mode's vocabulary (:attr:`class_tokens`).

        Computed on every call (never cached by the model: LoRA fusion changes the text tower). Must raise
        ``RuntimeError`` when no vocabulary is set. Used by the engine's evaluation, the orchestrator and
        the demos (once per vocabulary, or per image under fused adapters), and by
        ``fused_text_features`` with (B*T, P, L) tokens.
        """
        ...

    def __call__(
        self, batched_inputs: Sequence[Mapping[str, Any]], text_features: Tensor | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """The forward pass, on a list of detectron2-style input dicts: ``"image"`` (3, H, W) RGB 0-255,
        optional ``"height"`` / ``"width"`` (the output size), and ``"sem_seg"`` (H, W) train ids for
        training.

        Training mode returns a dict of scalar ``loss_*`` terms that the engine's ``Trainer`` sums (CAT-Seg:
        ``loss_sem_seg``; SAN: ``loss_ce``, ``loss_mask``, ``loss_dice`` and their ``_0`` auxiliary terms);
        eval mode returns one ``{"sem_seg": (T, height, width)}`` per input, non-negative class scores whose
        argmax is the prediction (CAT-Seg: sigmoid probabilities in [0, 1]; SAN: sums over its queries of
        class probability times mask probability, which can exceed 1). ``text_features``: (T, P, C) shared by the batch or
        (B, T, P, C) one row per image (the orchestrator's per-image fused text); ``None`` computes them
        with :meth:`text_features`. Used by the engine, the orchestrator, the demos and the benchmarks.
        """
        ...

    # -- inference settings ---------------------------------------------------------------------------------
    @property
    def sliding_window(self) -> bool:
        """Whether eval mode uses sliding-window inference (else whole-image).

        Set per target by the orchestrator (from the target's ``TEST.SLIDING_WINDOW``); the model's own
        default comes from the config it was built from.
        """
        ...

    @sliding_window.setter
    def sliding_window(self, value: bool) -> None: ...

    # -- the CLIP image tower (the "catseg" embedder) ---------------------------------------------------
    @property
    def clip_model(self) -> CLIP:
        """The model's CLIP towers (:class:`cat_seg.modeling.CLIP`).

        ``domain_orchestrator.embedding.CATSegEmbedder`` embeds images for retrieval with
        ``clip_model.visual(pixels, dense=False)`` (B, D) and reads ``clip_model.dtype`` and the tower's
        ``patch_size``, ``image_size``, ``output_dim``, ``proj``, ``transformer.width`` and
        ``transformer.resblocks[i].attn.num_heads`` (its identity); ``bench/catseg_speed.py`` times
        ``clip_model.visual.forward_intermediates``.
        """
        ...

    @property
    def clip_resolution(self) -> int:
        """Side of the square CLIP input; the catseg embedder resizes and crops images to it."""
        ...

    @property
    def clip_pixel_mean(self) -> Tensor:
        """(3, 1, 1) CLIP normalisation mean in 0-255 units; the catseg embedder normalises with it."""
        ...

    @property
    def clip_pixel_std(self) -> Tensor:
        """(3, 1, 1) CLIP normalisation standard deviation in 0-255 units (catseg embedder)."""
        ...

    # -- torch.nn.Module members the code relies on -----------------------------------------------------------
    @property
    def training(self) -> bool:
        """``nn.Module.training``: selects the vocabulary, the loss vs. predictions, and the guidance blocks."""
        ...

    def train(self, mode: bool = True) -> Any:
        """``nn.Module.train``: the engine's evaluation restores the previous mode with it."""
        ...

    def eval(self) -> Any:
        """``nn.Module.eval``: the orchestrator, the demos and the benchmarks predict in eval mode."""
        ...

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        """``nn.Module.named_modules``: LoRA targets are ``nn.Linear`` modules named by path (``cat_seg.lora``
        wraps them, ``domain_orchestrator.fusion.fused_adapters`` patches them, ``AdapterLibrary.open``
        checks an adapter's shapes against them); the engine's optimizer groups parameters by module."""
        ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        """``nn.Module.named_parameters``: trainable tensors (``requires_grad``) and LoRA tensors by name."""
        ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``: saving checkpoints and checking a checkpoint's names against the model."""
        ...

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``: ``cat_seg.checkpoint.load_checkpoint`` and resuming training."""
        ...
