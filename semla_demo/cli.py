"""The flags ``demo.py`` and the web demo (``demo.py --web``) share, defined once.

Both tools load a model with :meth:`semla_demo.inference.Segmenter.from_files`: the CAT-Seg config and
checkpoint, optionally an adapter library and the embedder of its statistics, SemLA's settings, a vocabulary,
the device and config overrides. They differ in the library's defaults (``demo.py``: none, zero-shot unless
given; the web demo: the library and CLIP ``make demo`` builds) and in the vocabulary (the web page's is only
the initial one). Importing this module costs nothing more than ``argparse``.
"""

from __future__ import annotations

import argparse

from .common import DEMO, SEMLA_CONFIG, TRAIN_CONFIG

__all__ = ["add_model_arguments", "add_run_arguments", "segmenter_from_args", "vocabulary"]

# The vocabulary flags' help: demo.py's, and the web demo's (its page can change the class names).
_VOCABULARY_HELP = {
    False: {
        "--classes": 'class names, comma-separated: "road,car,person" (default: the config\'s)',
        "--class-json": "a JSON list of class names (index = class id)",
        "--domain_spec": "the class names of a domain of your own, from its spec (docs/own_domain.md)",
    },
    True: {
        "--classes": "initial class names, comma-separated (default: the config's)",
        "--class-json": "initial class names from a JSON list",
        "--domain_spec": "initial class names: those of a domain of your own (its spec)",
    },
}


def add_model_arguments(
    parser: argparse.ArgumentParser, *, demo_library: bool = False, initial_classes: bool = False
) -> None:
    """Add the model's flags: ``--config-file`` (alias ``--config_file``), ``--weights``,
    ``--lora_library_path``, ``--embedding_model``, ``--semla_config`` and the exclusive vocabulary group
    ``--classes`` / ``--class-json`` / ``--domain_spec``.

    Args:
        parser: the tool's parser.
        demo_library: ``--lora_library_path`` and ``--embedding_model`` default to what ``make demo`` builds
            (``demo_output/loradb``, ``demo_output/clip``; the web demo); otherwise they have no default and
            prediction is zero-shot unless they are given (``demo.py``).
        initial_classes: the vocabulary flags set the initial class names only (the web page can change
            them); their help says so.
    """
    parser.add_argument(
        "--config-file",
        "--config_file",
        default=str(TRAIN_CONFIG),
        help="CAT-Seg config (default: the demo's tiny model, configs/demo/train.yaml)",
    )
    parser.add_argument(
        "--weights",
        default=str(DEMO / "base" / "model_final.pth"),
        help="CAT-Seg checkpoint (default: the one make demo trains, demo_output/base/model_final.pth)",
    )
    if demo_library:
        parser.add_argument(
            "--lora_library_path",
            default=str(DEMO / "loradb"),
            help="adapter library with its statistics (default: demo_output/loradb)",
        )
        parser.add_argument(
            "--embedding_model",
            default=str(DEMO / "clip"),
            help="the embedder that made the library's statistics (default: the demo's CLIP, demo_output/clip)",
        )
    else:
        parser.add_argument(
            "--lora_library_path", help="adapter library: apply SemLA per image (default: none, zero-shot)"
        )
        parser.add_argument(
            "--embedding_model", help="the embedder that made the library's statistics (semla)"
        )
    parser.add_argument(
        "--semla_config",
        default=str(SEMLA_CONFIG),
        help="YAML with distance_measure_name, temperature, top_k (default: the demo's, "
        "configs/demo/semla_config.yaml)",
    )
    vocabulary_help = _VOCABULARY_HELP[initial_classes]
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--classes", help=vocabulary_help["--classes"])
    vocab.add_argument("--class-json", help=vocabulary_help["--class-json"])
    vocab.add_argument("--domain_spec", metavar="FILE", help=vocabulary_help["--domain_spec"])


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device``, ``--debug`` and the trailing config overrides (``KEY VALUE ...``); call it last,
    after the tool's own flags."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE", help="config overrides"
    )


def vocabulary(args: argparse.Namespace) -> list[str] | None:
    """The class names the vocabulary flags ask for (``--classes`` / ``--class-json`` / ``--domain_spec``),
    or None for the config's."""
    if args.classes is not None:
        return [n.strip() for n in args.classes.split(",") if n.strip()]
    if args.class_json is not None:
        from cat_seg.modeling.text import load_class_names

        return load_class_names(args.class_json)
    if args.domain_spec is not None:
        from cat_seg.data.registry import register_domain_spec_file

        return list(register_domain_spec_file(args.domain_spec).class_names)
    return None


def segmenter_from_args(args: argparse.Namespace):  # noqa: ANN201 - a Segmenter (imported lazily)
    """The :class:`~semla_demo.inference.Segmenter` the model flags describe, with their vocabulary."""
    from .inference import Segmenter

    return Segmenter.from_files(
        args.config_file,
        args.weights,
        opts=args.opts or (),
        device=args.device,
        lora_library_path=args.lora_library_path,
        embedding_model=args.embedding_model,
        semla_config=args.semla_config,
        class_names=vocabulary(args),  # given, the config needs no class files (a model overlay will do)
    )
