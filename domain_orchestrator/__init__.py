"""SemLA: retrieve, weight and fuse LoRA adapters per test image. ``experiments.py`` and
``domain_orchestrator/generate_embeddings.py`` are its command lines.

The pipeline, module by module::

    domains      domain names -> config file and datasets (built-in, or your own from a domain spec)
    embedding    image files -> embeddings (HF CLIP folder, open_clip, or CAT-Seg's own image tower)
    prototypes   <lib>/<domain>/<domain>_statistics.npz: a domain's mean embedding, with the embedder's identity
                 (written by generate_embeddings.py, read and checked by load_prototypes)
    library      <lib>/<domain>/adapter_*: the adapters, validated against the model and stacked once
    retrieval    scores (1 / Euclidean distance or cosine similarity), top-k softmax weights, uniform weights
    fusion       fused_adapters / fused_text_features: the model under a different weighted sum of
                 adapters per image, without touching its parameters
    step         the per-image step, in one place: retrieve -> segment (fuse + predict)
    settings     what a run is asked: experiment names, semla_config.yaml, the command line
    plan         prepare(): every check before any model is built -> a picklable ExperimentPlan
    loop         run(): build once, then per target and batch, every experiment through step.segment
    resume       the per-process resume state inside a target (--resume)
    reporting    results.json / weights.json / metrics.json / summary.txt, the original's shapes
    orchestrator the public names of settings, plan and loop in one import

Importing this package imports nothing heavy; each module imports what it needs.
"""
