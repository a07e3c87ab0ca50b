"""The experiment loop: build once, then for every target evaluate every experiment on each batch.

:func:`run` (called in every process of a run with the plan of :func:`domain_orchestrator.plan.prepare`)
builds the model(s), opens the adapter library, the embedder and the prototypes (:class:`Session`,
reporting every problem together), then evaluates target after target and lets rank 0 write the
outputs (:mod:`domain_orchestrator.reporting`). Per batch, every experiment predicts through
:func:`domain_orchestrator.step.segment` with its weights: none (``zeroshot``), the target's own adapter
(``oracle``), 1/N over the sources (``uniform``) or each image's retrieved weights (``semla``,
:func:`domain_orchestrator.step.retrieve`). Under ``torch.distributed`` each process evaluates a
contiguous shard of every target; confusion matrices are summed and weights gathered, so the outputs
equal a one-process run. With ``TEST.AUG.ENABLED`` (``experiments.py --tta``) every experiment predicts
each batch from the test-time views (:func:`~domain_orchestrator.step.segment`'s ``tta``): the weights
and the text features stay those of the original image, computed once. Inside a target, the resume
state (:mod:`domain_orchestrator.resume`) is saved every ``save_every`` seconds and on interruption.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cat_seg.checkpoint import load_checkpoint
from cat_seg.config import CfgNode
from cat_seg.data import InferenceSampler, get_dataset, mapper_from_cfg
from cat_seg.data.build import MappedDataset, trivial_batch_collator
from cat_seg.engine.evaluate import label_prediction
from cat_seg.engine.io import atomic_write_json
from cat_seg.engine.launch import DistInfo, all_gather_objects, barrier
from cat_seg.engine.setup import collect_run_info, resolve_device
from cat_seg.evaluation import SemSegEvaluator
from cat_seg.modeling import build_model
from cat_seg.progress import progress
from cat_seg.test_time_augmentation import TTASettings

from .embedding import EmbeddingError, load_embedder
from .fusion import fused_text_features
from .library import AdapterLibrary, AdapterLibraryError
from .merging import check_combination, merged_library
from .plan import ExperimentPlan, TargetPlan, class_names
from .prototypes import load_prototypes
from .reporting import RUN_CONFIG_FILE, ImageWeights, ResultsBook, format_summary
from .resume import RESUME_DIR, ResumeState, load_resume_state, resume_file, save_resume_state
from .retrieval import uniform_weights
from .settings import ExperimentError, is_semla
from .step import kept_adapters, retrieve, segment

logger = logging.getLogger(__name__)

__all__ = ["Session", "run"]


@dataclass
class _Job:
    """One target being evaluated in this process."""

    target: TargetPlan
    model: Any
    library: AdapterLibrary | None
    spec: Any  # the target's DatasetSpec
    begin: int  # the shard's first image in the target
    shard: list[dict[str, Any]]
    state: ResumeState
    evaluators: dict[str, SemSegEvaluator]
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)  # oracle / uniform: (1, N)
    semla_rows: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # per semla column: (n, N), one row per image
    first_row: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # --text_features reference: first image's
    uniform_record: dict[str, float] = field(default_factory=dict)
    shared_text: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: dict[str, tuple[Any, torch.Tensor]] = field(default_factory=dict)  # merged once per target
    tta: TTASettings | None = None  # the target's TEST.AUG views (None: one forward pass per batch)


class Session:
    """The models, library, embedder and prototypes of one process, built and validated once."""

    def __init__(self, plan: ExperimentPlan, device: torch.device, info: DistInfo) -> None:
        self.plan = plan
        self.device = device
        self.info = info
        problems: list[str] = []
        self.models: dict[str, Any] = {}
        self.libraries: dict[str, AdapterLibrary | None] = {}
        for target in plan.targets:
            if target.arch in self.models:
                continue
            model = build_model(target.cfg, device, class_names=False)
            try:
                load_checkpoint(model, plan.model_weights)
            except (ValueError, OSError) as e:
                problems.append(f"checkpoint {plan.model_weights}: {e}")
            model.eval()
            self.models[target.arch] = model
            library = None
            if plan.library_names:
                try:
                    library = AdapterLibrary.open(
                        plan.library_path, plan.library_names, model=model, device=device
                    )
                except AdapterLibraryError as e:
                    problems.append(str(e))
            self.libraries[target.arch] = library
        opened = next((lib for lib in self.libraries.values() if lib is not None), None)
        reference = [i.name for i in opened.infos if i.reference_training] if opened is not None else []
        if reference and info.is_main:
            logger.warning(
                "adapters trained in the original trainer's mode (MODEL.LORA.REFERENCE_TRAINING: inert CLIP "
                "q/k/v LoRA, first guidance block twice during training; see their semla_training.json): %s",
                ", ".join(reference),
            )
        self.embedder = None
        self.prototypes: torch.Tensor | None = None
        if any(is_semla(e) for e in plan.experiments):
            first_model = next(iter(self.models.values()))
            self.embedder, self.prototypes = self._retrieval_setup(first_model, problems)
        combined = {e: spec for e in plan.experiments if (spec := self._combination(e)) is not None}
        # a merge PEFT would refuse, said before any image (the library holds the sources when uniform or
        # semla run; with oracle alone it holds the targets' adapters only)
        if opened is not None and plan.sources and combined:
            ranks = [opened.infos[i].rank for i in opened.index(plan.sources)]
            for experiment, spec in combined.items():
                reason = check_combination(spec, ranks)
                if reason is not None:
                    problems.append(f"{experiment}: combination_type {spec.combination_type}: {reason}")
        if problems:
            raise ExperimentError(problems)

    def _retrieval_setup(self, model: Any, problems: list[str]) -> tuple[Any, torch.Tensor | None]:
        spec = self.plan.settings.embedding_model
        try:
            embedder = load_embedder(spec, device=self.device, catseg_model=model)
        except (EmbeddingError, OSError, ValueError) as e:
            problems.append(f"--embedding_model {spec}: {e}")
            embedder = None
        prototypes = load_prototypes(
            self.plan.library_path,
            self.plan.sources,
            embedder.identity if embedder is not None else None,
            spec=f"--embedding_model {spec}",
        )
        problems.extend(prototypes.problems)
        if prototypes.unverified and self.info.is_main:
            logger.warning(
                "the statistics of %s record no embedder (made by the original code or released with it); "
                "they are assumed to come from %s",
                ", ".join(prototypes.unverified),
                spec,
            )
        vectors = torch.from_numpy(prototypes.vectors) if prototypes.vectors is not None else None
        return embedder, vectors

    # -- one target ----------------------------------------------------------------------------------
    def run_target(
        self, target: TargetPlan
    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[ImageWeights]], dict[str, float]]:
        """Evaluate every experiment on one target; returns metrics, per semla column the images' weights,
        and the uniform weights."""
        job = self._open(target)  # the model's vocabulary, this process's shard, its resume state, evaluators
        self._weigh(job)  # each experiment's adapter weights (semla: each image's retrieval)
        self._evaluate(job)  # every batch through every experiment, resumable
        metrics = {e: job.evaluators[e].evaluate()["sem_seg"] for e in self.plan.experiments}
        image_weights: dict[str, list[ImageWeights]] = {}
        for column, rows in job.semla_rows.items():
            local = [
                _image_weights(record, row, job.library.names, self.plan.datasets_root)
                for record, row in zip(job.shard, rows)
            ]
            image_weights[column] = [w for part in all_gather_objects(local) for w in part]
        return metrics, image_weights, job.uniform_record

    def _open(self, target: TargetPlan) -> _Job:
        model = self.models[target.arch]
        spec = get_dataset(target.dataset)
        model.set_class_names(test=class_names(target.cfg))
        model.sliding_window = bool(target.cfg.TEST.SLIDING_WINDOW)
        begin, end = _shard(len(target.records), self.plan.settings.batch_size, self.info)
        shard = target.records[begin:end]
        state = self._load_state(target, len(shard))
        evaluators = {}
        for experiment in self.plan.experiments:
            evaluator = SemSegEvaluator(
                spec.num_classes,
                spec.ignore_label,
                class_names=spec.class_names(),
                convention=spec.metric_convention,
            )
            if experiment in state.confusion:
                evaluator.add_confusion(state.confusion[experiment].numpy(), state.num_images[experiment])
            evaluators[experiment] = evaluator
        tta = TTASettings.from_cfg(target.cfg)
        if tta is not None and self.info.is_main:
            logger.info("%s: test-time augmentation, %s", target.name, tta.describe())
        return _Job(
            target, model, self.libraries[target.arch], spec, begin, shard, state, evaluators, tta=tta
        )

    def _weigh(self, job: _Job) -> None:
        """Weights (rows over the library's columns; uniform and semla use the sources only)."""
        plan, library, target = self.plan, job.library, job.target
        num_adapters = len(library) if library is not None else 0
        # uniform and semla weigh the sources (with oracle alone, the library holds the targets' adapters only)
        weighs_sources = any(e == "uniform" or is_semla(e) for e in plan.experiments)
        source_columns = (
            library.index(plan.sources) if library is not None and plan.sources and weighs_sources else []
        )
        exclude = (
            [plan.sources.index(target.name)]
            if plan.settings.remove_target_adapter and target.name in plan.sources
            else None
        )

        def to_library(local: torch.Tensor) -> torch.Tensor:
            full = torch.zeros(local.shape[0], num_adapters, dtype=torch.float64)
            full[:, source_columns] = local
            return full

        if "oracle" in plan.experiments:
            job.fixed["oracle"] = torch.zeros(1, num_adapters, dtype=torch.float64)
            job.fixed["oracle"][0, library.index(target.name)[0]] = 1.0
        if "uniform" in plan.experiments:
            job.fixed["uniform"] = to_library(uniform_weights(len(plan.sources), exclude=exclude))
            job.uniform_record = {
                name: float(w)
                for name, w in zip(plan.sources, job.fixed["uniform"][0, source_columns])
                if w != 0
            }
        columns = [e for e in plan.experiments if is_semla(e)]
        if columns:  # one embedding per image, shared by every semla column
            state = job.state
            if state.embeddings is None:
                files = [r["file_name"] for r in job.shard]
                state.embeddings = torch.from_numpy(self._embed(files, f"{target.name} embeddings"))
                self._save_state(target, state, len(job.shard))
            first = None
            if plan.settings.text_features == "reference":
                first = state.embeddings[:1] if job.begin == 0 and len(job.shard) else None
                if first is None:  # the target's first image is in another process's shard
                    first = torch.from_numpy(self._embed([target.records[0]["file_name"]], "first image"))
            for column in columns:
                job.semla_rows[column] = to_library(self._semla_weights(state.embeddings, exclude, column))
                if first is not None:
                    job.first_row[column] = to_library(self._semla_weights(first, exclude, column))

    def _combination(self, experiment: str) -> Any:
        """The merging type of ``uniform`` and the semla columns (None: ``cat``, fusion's own exact sum)."""
        if experiment == "uniform" or is_semla(experiment):
            return self.plan.semla_config(experiment).combination()
        return None

    def _fused(
        self, job: _Job, experiment: str, rows: torch.Tensor | None, *, cache: bool = False
    ) -> tuple[Any, torch.Tensor | None]:
        """What to fuse for ``rows``: the library and the rows (``cat``), or each row's merged adapter
        (PEFT's other combination types) with the identity as weights. ``cache``: a target's fixed rows
        (uniform; semla's first image under ``--text_features reference``) are merged once per target."""
        spec = self._combination(experiment)
        if spec is None or rows is None:
            return job.library, rows
        if cache and experiment in job.merged:
            return job.merged[experiment]
        fused = (merged_library(job.library, rows, spec), torch.eye(rows.shape[0], dtype=torch.float64))
        if cache:
            job.merged[experiment] = fused
        return fused

    def _text_features(
        self, job: _Job, experiment: str, library: Any, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """Class-text features: per image under semla's per_image policy, else shared by the target."""
        if is_semla(experiment) and self.plan.settings.text_features == "per_image":
            return fused_text_features(job.model, library, weights)  # (B, T, P, C)
        if experiment not in job.shared_text:
            if experiment == "zeroshot":
                job.shared_text[experiment] = job.model.text_features()
            else:
                base = job.first_row[experiment] if is_semla(experiment) else job.fixed[experiment]
                shared_library, shared = self._fused(job, experiment, base, cache=True)
                job.shared_text[experiment] = fused_text_features(job.model, shared_library, shared)[0]
        return job.shared_text[experiment]

    def _predict(self, job: _Job, batch: list[dict[str, Any]]) -> dict[str, list]:
        """Every experiment's label maps of one batch (nothing recorded yet)."""
        position = job.state.position
        predictions: dict[str, list] = {}
        for experiment in self.plan.experiments:
            if is_semla(experiment):
                rows = job.semla_rows[experiment][position : position + len(batch)]
            else:
                rows = job.fixed.get(experiment)
            library, weights = self._fused(job, experiment, rows, cache=experiment in job.fixed)
            text = self._text_features(job, experiment, library, weights)
            outputs = segment(job.model, library, batch, weights, text_features=text, tta=job.tta)
            predictions[experiment] = [
                label_prediction(o["sem_seg"], x["sem_seg"], resize_to_label=job.spec.resize_to is not None)
                for o, x in zip(outputs, batch)
            ]
        return predictions

    def _evaluate(self, job: _Job) -> None:
        """Predict and score the rest of the shard; save the resume state every ``save_every`` seconds and
        when interrupted (not halfway through recording a batch)."""
        plan, info, target, state = self.plan, self.info, job.target, job.state
        settings = plan.settings
        mapper = mapper_from_cfg(target.cfg, is_train=False, num_classes=job.spec.num_classes)
        loader = torch.utils.data.DataLoader(
            MappedDataset(job.shard[state.position :], mapper),
            batch_size=settings.batch_size,
            shuffle=False,
            num_workers=self._num_workers(target.cfg),
            collate_fn=trivial_batch_collator,
        )
        last_save = time.monotonic()
        start, done_here = time.monotonic(), 0
        committing = False
        try:
            batches = progress(
                loader,
                total=len(job.shard),
                initial=state.position,
                desc=f"{target.name}" + (f" [rank {info.rank}]" if info.world_size > 1 else ""),
                unit="img",
                enabled=settings.progress and info.is_main,
                log=logger,
                weight=len,
            )
            with torch.no_grad():
                for batch in batches:
                    predictions = self._predict(job, batch)
                    committing = True
                    for experiment, preds in predictions.items():
                        for pred, x in zip(preds, batch):
                            job.evaluators[experiment].process(
                                pred, x["sem_seg"], name=str(x.get("file_name"))
                            )
                    state.position += len(batch)
                    committing = False
                    done_here += len(batch)
                    if time.monotonic() - last_save >= settings.save_every:
                        state.record(job.evaluators)
                        self._save_state(target, state, len(job.shard))
                        last_save = time.monotonic()
        except BaseException:
            if not committing and done_here:
                state.record(job.evaluators)
                self._save_state(target, state, len(job.shard))
                logger.warning(
                    "%s: interrupted after %d of %d images of this process; resume state saved, --resume continues",
                    target.name,
                    state.position,
                    len(job.shard),
                )
            raise
        seconds = time.monotonic() - start
        if done_here:
            logger.info(
                "%s: %d images in %.1f s (%.3f s/image, %d experiment(s) each)",
                target.name,
                done_here,
                seconds,
                seconds / done_here,
                len(plan.experiments),
            )

    # -- helpers ------------------------------------------------------------------------------------
    def _semla_weights(
        self, embeddings: torch.Tensor, exclude: list[int] | None, column: str
    ) -> torch.Tensor:
        return retrieve(
            embeddings, self.prototypes, self.plan.semla_config(column), exclude=exclude
        )  # (n, S)

    def _embed(self, files: Sequence[str], desc: str) -> np.ndarray:
        if not files:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        settings = self.plan.settings
        return self.embedder.embed_files(
            files,
            # One image per forward pass, as the original: a vector must not depend on which images share
            # its batch (batched matmuls round differently), so that results do not depend on the number
            # of processes or on --batch_size.
            batch_size=1,
            num_workers=settings.num_workers or 0,
            progress=settings.progress and self.info.is_main,
            desc=desc,
        )

    def _num_workers(self, cfg: CfgNode) -> int:
        workers = self.plan.settings.num_workers
        return int(cfg.DATALOADER.NUM_WORKERS) if workers is None else workers

    def _resume_file(self, target: TargetPlan) -> Path:
        return resume_file(self.plan.output_dir, target.name, self.info.rank)

    def _run_identity(self, target: TargetPlan, shard: int) -> dict[str, Any]:
        return {
            "target": target.name,
            "rank": self.info.rank,
            "world_size": self.info.world_size,
            "batch_size": self.plan.settings.batch_size,
            "shard": shard,
        }

    def _save_state(self, target: TargetPlan, state: ResumeState, shard: int) -> None:
        save_resume_state(self._resume_file(target), state, self._run_identity(target, shard))

    def _load_state(self, target: TargetPlan, shard: int) -> ResumeState:
        path = self._resume_file(target)
        if not (self.plan.settings.resume and path.is_file()):
            return ResumeState()
        return load_resume_state(path, self._run_identity(target, shard))

    def finish_target(self, target: TargetPlan) -> None:
        self._resume_file(target).unlink(missing_ok=True)


def _image_weights(
    record: Mapping[str, Any], row: torch.Tensor, names: Sequence[str], root: Path
) -> ImageWeights:
    """The kept adapters of one image (weight > 0), best first (ties in library order)."""
    kept = kept_adapters(row, names)
    file_name = Path(record["file_name"])
    try:
        image = file_name.relative_to(root).as_posix()
    except ValueError:
        image = file_name.as_posix()
    return ImageWeights(image, tuple(kept), tuple(kept.values()))


def _shard(num_images: int, batch_size: int, info: DistInfo) -> tuple[int, int]:
    """This process's contiguous share of a target's images, in whole batches.

    The images are cut into batches first and the batches are shared out (detectron2's split: the first
    ranks get one more), so every image is predicted in the same batch whatever the number of
    processes, and the outputs equal a one-process run.
    """
    sampler = InferenceSampler(math.ceil(num_images / batch_size), rank=info.rank, world_size=info.world_size)
    return min(sampler.begin * batch_size, num_images), min(sampler.end * batch_size, num_images)


def _configure_threads(device: torch.device, world_size: int) -> None:
    if device.type == "cpu" and world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def run(plan: ExperimentPlan, info: DistInfo | None = None) -> ResultsBook | None:
    """Run a prepared plan in this process (every process of a distributed run calls it).

    Rank 0 writes ``run_config.json`` first, then the outputs after each target (see
    :mod:`domain_orchestrator.reporting`), and prints the summary table at the end.

    Returns:
        the results on rank 0, None on the other ranks.
    """
    info = info or DistInfo()
    settings = plan.settings
    device = resolve_device(settings.device, local_rank=info.local_rank, num_processes=info.world_size)
    _configure_threads(device, info.world_size)
    output_dir = plan.output_dir
    book = None
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if settings.overwrite and not settings.resume:
            shutil.rmtree(output_dir / RESUME_DIR, ignore_errors=True)
        book = (
            ResultsBook.load(
                output_dir,
                experiments=plan.experiments,
                targets=[t.name for t in plan.targets],
                sources=plan.sources,
            )
            if settings.resume
            else ResultsBook(plan.experiments, [t.name for t in plan.targets], plan.sources)
        )
    barrier()
    session = Session(plan, device, info)
    if info.is_main:
        _write_run_config(plan, session, device, info)
        logger.info(
            "experiments %s on %d target(s), %d source(s), %s, %d process(es)",
            ", ".join(plan.experiments),
            len(plan.targets),
            len(plan.sources),
            device,
            info.world_size,
        )
    for target in plan.targets:
        if target.name in plan.finished:
            logger.info("%s: finished in an earlier run, skipped", target.name)
            continue
        metrics, image_weights, uniform = session.run_target(target)
        if info.is_main:
            book.add_target(
                target.name,
                metrics,
                semla=image_weights if any(is_semla(e) for e in plan.experiments) else None,
                uniform=uniform if "uniform" in plan.experiments else None,
            )
            book.write(output_dir)
        barrier()  # outputs written before any process drops its progress file
        session.finish_target(target)
    if info.is_main:
        print(format_summary(book), flush=True)
        print(f"results written to {output_dir}", flush=True)
    return book


def _write_run_config(plan: ExperimentPlan, session: Session, device: torch.device, info: DistInfo) -> None:
    library = next(iter(session.libraries.values()), None)
    data = collect_run_info(argv=plan.settings.argv, device=device, world_size=info.world_size, seed=0)
    data.pop("seed")
    data.update(
        {
            "experiments": plan.experiments,
            "sources": plan.sources,
            "targets": [t.name for t in plan.targets],
            "semla_config": plan.semla.as_dict()
            if not plan.semla_columns
            else {column: c.as_dict() for column, c in plan.semla_columns.items()},
            "text_features": plan.settings.text_features,
            "remove_target_adapter": plan.settings.remove_target_adapter,
            "model_weights": str(plan.model_weights),
            "lora_library_path": str(plan.library_path),
            "adapters": []
            if library is None
            else [
                {
                    "name": i.name,
                    "r": i.rank,
                    "lora_alpha": i.alpha,
                    "scaling": i.scaling,
                    "folder": str(i.folder),
                    "reference_training": i.reference_training,
                }
                for i in library.infos
            ],
            "embedding_model": plan.settings.embedding_model,
            "embedder": session.embedder.identity if session.embedder is not None else None,
            "datasets_root": str(plan.datasets_root),
            "config_overlays": [str(p) for p in plan.settings.config_overlays],
            "opts": list(plan.settings.opts),
            "batch_size": plan.settings.batch_size,
            "fingerprint": plan.fingerprint,
        }
    )
    atomic_write_json(plan.output_dir / RUN_CONFIG_FILE, data)
