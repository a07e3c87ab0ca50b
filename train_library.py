"""Train a whole SemLA adapter library in one command (see ``domain_orchestrator/train_library.py``).

    python train_library.py --source_domains configs/source_domains.yaml --lora_library_path catseg/loradb \\
        --model_weights models/model_final.pth --embedding_model models/clip-vit-large-patch14 \\
        --output_dir runs/library --executor local --gpus 0,1,2,3
    python train_library.py ... --executor slurm --slurm_partition gpu --slurm_time 8:00:00 --dry_run

Exit status: 0 when every adapter and prototype of the list exists at the end, 1 otherwise (or when the
build is refused: the message says why), 2 for a usage error.
"""

from __future__ import annotations

import sys

from domain_orchestrator.train_library import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
