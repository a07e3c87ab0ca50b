"""End to end: run_lora.sh / eval_lora.sh / train_net.py on a synthetic ACDC-rain root with the tiny preset.

One 20-iteration LoRA run through ``sh catseg/run_lora.sh`` (module fixture ``trained``) and the same
run made in-process, crashed at iteration 12 and resumed (fixture ``resumed``, which keeps the trained
model in memory) are shared by the tests that inspect their outputs; the other tests run
``train_net.main`` in-process or the wrappers in subprocesses.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from engine_testlib import (
    TINY_CONFIG,
    VAL,
    eval_inputs,
    fixed_batch,
    lora_opts,
    make_root,
    run_script,
    single_thread,
    tiny_with_base,
    train_net,
    tree_digest,
)
from safetensors.torch import load_file

from cat_seg.engine import RunOutcome, lora_state_dict, run, state_digest, unwrap_model
from cat_seg.engine.checkpoint import save_training_checkpoint

NAME = "x"


@dataclass
class Env:
    root: Path
    base: Path


@dataclass
class Trained:
    out: Path
    db: Path
    result: subprocess.CompletedProcess[str]

    @property
    def adapter(self) -> Path:
        return self.db / NAME


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root, base = make_root(tmp_path_factory.mktemp("engine_env"))
    return Env(root, base)


@pytest.fixture(scope="module")
def trained(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    folder = tmp_path_factory.mktemp("trained")
    out, db = folder / "out", folder / "loradb"
    result = run_script(
        "run_lora.sh",
        [str(TINY_CONFIG), "1", str(out), "SOLVER.MAX_ITER", "20", "MODEL.WEIGHTS", str(env.base),
         "MODEL.LORA.DB_PATH", str(db), "MODEL.LORA.NAME", NAME],
        data_root=env.root,
        extra_env={"TRAIN_NET_ARGS": "--log-period 1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return Trained(out, db, result)


def _argv(env: Env, out: Path, db: Path, *extra: str, max_iter: int = 20) -> list[str]:
    """train_net.py arguments equivalent to run_lora.sh (plus ``extra`` flags)."""
    return [
        "--config-file", str(TINY_CONFIG), "--data-root", str(env.root), "--resume", "--no-progress",
        "--log-period", "1", *extra, *lora_opts(out, db, env.base, max_iter=max_iter),
    ]  # fmt: skip


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _predict(model: torch.nn.Module, inputs: list[dict]) -> list[torch.Tensor]:
    catseg = unwrap_model(model)
    catseg.eval()
    with torch.no_grad():
        return [o["sem_seg"] for o in catseg(inputs)]


# --------------------------------------------------------------------------------------------------
# run_lora.sh
# --------------------------------------------------------------------------------------------------


def test_run_lora_sh_writes_a_peft_adapter_and_the_run_record(trained: Trained) -> None:
    assert sorted(p.name for p in trained.adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in trained.db.iterdir()) == [NAME]  # no model card, no temporary folder
    config = json.loads((trained.adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    assert len(config["target_modules"]) == 3 * 5 + 2 * 5 + 2 * 17  # full paths, not PEFT suffixes
    assert (
        config["target_modules"][0]
        == "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.attn.q_proj"
    )
    keys = load_file(str(trained.adapter / "adapter_model.safetensors"))
    assert all(
        k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys
    )

    out = trained.out
    names = {p.name for p in out.iterdir()}
    assert {
        "config.yaml",
        "run_info.json",
        "log.txt",
        "metrics.jsonl",
        "last_checkpoint",
        "inference",
    } <= names
    assert {"model_0000009.pth", "model_0000019.pth", "model_final.pth"} <= names
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    info = json.loads((out / "run_info.json").read_text())
    assert info["device"] == "cpu" and info["seed"] == 250 and info["packages"]["torch"]
    assert "git_sha" in info and "--resume" in info["argv"]
    iterations = [r["iteration"] for r in _records(out) if "total_loss" in r]
    assert iterations == list(range(20))
    assert "trainable: base_model.model." in (out / "log.txt").read_text()  # trainable names in the log
    metrics = json.loads((out / "inference" / VAL / "metrics.json").read_text())
    assert metrics["metric"] == "IoU" and metrics["iteration"] == 19 and metrics["sem_seg"]["num_images"] == 4
    assert VAL in trained.result.stdout and "adapter saved to" in trained.result.stdout


def test_training_lowered_the_loss_on_a_fixed_batch(env: Env, trained: Trained) -> None:
    from peft import PeftModel

    batch = fixed_batch(env.root)

    def loss(model: torch.nn.Module) -> float:
        model.train()
        with torch.no_grad():
            return float(model(batch)["loss_sem_seg"])

    before = loss(tiny_with_base(env.base))
    adapted = PeftModel.from_pretrained(tiny_with_base(env.base), str(trained.adapter), adapter_name=NAME)
    after = loss(adapted.get_base_model())
    assert after < before - 0.01, (before, after)


# --------------------------------------------------------------------------------------------------
# eval_lora.sh
# --------------------------------------------------------------------------------------------------


def test_eval_lora_sh_prints_and_writes_metrics_from_another_directory(
    env: Env, trained: Trained, tmp_path: Path
) -> None:
    result = run_script(
        "eval_lora.sh",
        ["configs/tiny/tiny.yaml", "1", "results", "MODEL.WEIGHTS", str(env.base),
         "MODEL.LORA.DB_PATH", str(trained.db), "MODEL.LORA.NAME", NAME],
        data_root=env.root,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "results" / "eval"  # OUTPUT_DIR <out>/eval, relative to the caller's directory
    metrics = json.loads((out / "inference" / VAL / "metrics.json").read_text())
    sem_seg = metrics["sem_seg"]
    assert {"IoU", "mIoU", "pACC"} <= set(sem_seg) and sem_seg["num_images"] == 4
    assert metrics["metric"] == "IoU" and metrics["value"] == sem_seg["IoU"]
    assert VAL in result.stdout and f"{sem_seg['IoU']:.2f}" in result.stdout
    assert "copypaste: " in (out / "log.txt").read_text()
    # Same adapter, same data: the training run's final evaluation gave the same numbers.
    final = json.loads((trained.out / "inference" / VAL / "metrics.json").read_text())["sem_seg"]
    assert final["IoU"] == sem_seg["IoU"] and final["mIoU"] == sem_seg["mIoU"]
    assert not list(out.glob("*.pth"))


# --------------------------------------------------------------------------------------------------
# Two processes (gloo)
# --------------------------------------------------------------------------------------------------


def test_two_cpu_processes_train_one_adapter_identical_on_both_ranks(env: Env, tmp_path: Path) -> None:
    from peft import PeftModel

    out, db = tmp_path / "out", tmp_path / "db"
    result = run_script(
        "run_lora.sh",
        [str(TINY_CONFIG), "2", str(out), "SOLVER.MAX_ITER", "4", "MODEL.WEIGHTS", str(env.base),
         "MODEL.LORA.DB_PATH", str(db), "MODEL.LORA.NAME", NAME],
        data_root=env.root,
        extra_env={"TRAIN_NET_ARGS": "--device cpu --log-period 1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    records = _records(out)
    digests = next(r["per_rank"] for r in records if r.get("event") == "trainable_digest")
    assert len(digests) == 2 and digests[0] == digests[1]
    reloaded = PeftModel.from_pretrained(tiny_with_base(env.base), str(db / NAME), adapter_name=NAME)
    assert state_digest(lora_state_dict(reloaded, NAME)) == digests[0]  # the file holds what both ranks hold
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1, 2, 3]
    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2
    metrics = json.loads((out / "inference" / VAL / "metrics.json").read_text())
    assert metrics["sem_seg"]["num_images"] == 4  # two shards of 2, summed by the evaluator
    assert sorted(p.name for p in db.iterdir()) == [NAME]


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


@dataclass
class Resumed:
    out: Path
    db: Path
    outcome: RunOutcome


@pytest.fixture(scope="module")
def resumed(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    """The run of ``trained``, in-process, crashed at iteration 12 and resumed (the model stays in memory)."""
    from cat_seg.engine.train import Trainer

    tn = train_net()
    folder = tmp_path_factory.mktemp("resumed")
    out, db = folder / "out", folder / "db"
    argv = [*_argv(env, out, db), "TEST.EVAL_PERIOD", "5"]
    run_step = Trainer.run_step

    def crash_at_12(self: Trainer, batch: list[dict]) -> dict[str, float]:
        if self.iter == 12:
            raise KeyboardInterrupt("simulated crash")
        return run_step(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "run_step", crash_at_12)
        assert tn.main(argv) == 130  # Ctrl-C: "interrupted", no traceback
    # The periodic checkpoint is after iteration 10 (model_0000009); the crash in iteration 13 saved the
    # two iterations finished since (model_0000011), so no work is lost.
    assert (out / "last_checkpoint").read_text() == "model_0000011.pth"
    assert not (db / NAME).exists()
    outcome = run(
        tn.plan_from_args(tn.build_parser().parse_args(argv))
    )  # what main() runs, keeping the model
    return Resumed(out, db, outcome)


def test_interrupted_run_resumes_to_the_uninterrupted_adapter(resumed: Resumed, trained: Trained) -> None:
    records = _records(resumed.out)
    starts = [r["start_iter"] for r in records if r.get("event") == "train_start"]
    assert starts == [0, 12]
    second = records[next(i for i, r in enumerate(records) if r.get("start_iter") == 12) :]
    assert [r["iteration"] for r in second if "total_loss" in r] == list(range(12, 20))
    first_lrs = {r["iteration"]: r["lr"] for r in _records(trained.out) if "total_loss" in r}
    assert all(r["lr"] == first_lrs[r["iteration"]] for r in second if "total_loss" in r)
    evaluations = [r["iteration"] for r in records if r.get("event") == "evaluation"]
    assert evaluations == [4, 9, 14, 19]  # every TEST.EVAL_PERIOD iterations, and at the end
    saved = load_file(str(resumed.db / NAME / "adapter_model.safetensors"))
    uninterrupted = load_file(str(trained.adapter / "adapter_model.safetensors"))
    assert saved.keys() == uninterrupted.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], uninterrupted[key], rtol=0, atol=1e-7)


def test_adapter_reloads_with_peft_and_equals_the_model_in_memory(
    env: Env, trained: Trained, resumed: Resumed
) -> None:
    from peft import PeftModel

    inputs = eval_inputs(env.root)
    in_memory = _predict(resumed.outcome.model, inputs)
    for adapter in (resumed.db / NAME, trained.adapter):  # its own file, and run_lora.sh's
        reloaded = PeftModel.from_pretrained(tiny_with_base(env.base), str(adapter), adapter_name=NAME)
        for a, b in zip(in_memory, _predict(reloaded, inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The adapter matters: the base model predicts something else.
    base_out = _predict(tiny_with_base(env.base), inputs)
    assert max(float((a - b).abs().max()) for a, b in zip(in_memory, base_out)) > 1e-4
    # Only LoRA tensors changed: every base weight is still the checkpoint's.
    base_state = torch.load(env.base, weights_only=True)["model"]
    state = {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
        for k, v in resumed.outcome.model.state_dict().items()
        if "lora_" not in k
    }
    assert set(state) == set(base_state)
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)


# --------------------------------------------------------------------------------------------------
# Full-model runs (run.sh / eval.sh equivalents) and the LoRA / full-model resume guard
# --------------------------------------------------------------------------------------------------


def test_full_finetuning_checkpoint_is_evaluable_and_not_resumable_as_lora(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tn = train_net()
    out = tmp_path / "full"
    common = ["--config-file", str(TINY_CONFIG), "--data-root", str(env.root), "--no-progress"]
    assert tn.main([*common, "--resume", "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(env.base),
                    "MODEL.LORA.ENABLED", "False", "SOLVER.MAX_ITER", "2"]) == 0  # fmt: skip
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["lora"] is None and "sem_seg_head.predictor.transformer.conv1.weight" in final["model"]
    assert tn.main([*common, "--eval-only", "OUTPUT_DIR", str(out / "eval"),
                    "MODEL.WEIGHTS", str(out / "model_final.pth")]) == 0  # fmt: skip
    assert (out / "eval" / "inference" / VAL / "metrics.json").is_file()

    before = tree_digest(out)
    capsys.readouterr()
    assert tn.main(_argv(env, out, tmp_path / "db")) == 1
    err = capsys.readouterr().err
    assert "model_final.pth is a checkpoint of a full CAT-Seg fine-tuning run" in err and "LoRA run" in err
    assert tree_digest(out) == before


# --------------------------------------------------------------------------------------------------
# Refused runs: clear errors before any step, nothing written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        (
            ["DATASETS.TEST", '("acdc-fog_sem_seg_val",)'],
            ["DATASETS.TEST", "acdc-fog_sem_seg_val", "does not exist"],
        ),
        (
            ["DATASETS.TRAIN", '("acdc-rian_sem_seg_train",)'],
            ["DATASETS.TRAIN", "unknown dataset", "acdc-rain_sem_seg_train"],
        ),
        (["MODEL.WEIGHTS", "/nonexistent/base.pth"], ["MODEL.WEIGHTS /nonexistent/base.pth", "not found"]),
        (
            [
                "MODEL.LORA.MODUELS",
                "['sem_seg_head.predictor.clip_model.visual.transformer.resblocks.7.mlp.c_fc']",
            ],
            ["LoRA target module", "resblocks.7.mlp.c_fc"],
        ),
        (
            ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", "datasets/ade150.json"],
            ["acdc-rain_sem_seg_val", "TEST_CLASS_JSON"],
        ),
        (["SOLVER.LR_SCHEDULER_NAME", "WarmupFooLR"], ["SOLVER.LR_SCHEDULER_NAME", "WarmupFooLR"]),
    ],
    ids=[
        "missing-data",
        "unknown-dataset",
        "missing-checkpoint",
        "bad-lora-target",
        "wrong-classes",
        "bad-scheduler",
    ],
)
def test_bad_input_is_refused_before_training(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str], opts: list[str], expected: list[str]
) -> None:
    out, db = tmp_path / "out", tmp_path / "db"
    assert train_net().main([*_argv(env, out, db), *opts]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # earlier lines: the console log of the checks
    assert err.startswith("train_net.py: error: ")
    for text in expected:
        assert text in err
    assert not out.exists() and not db.exists()


def test_existing_adapter_and_output_are_kept(
    env: Env, trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tn = train_net()
    adapter_before, out_before = tree_digest(trained.db), tree_digest(trained.out)
    # A new run whose adapter folder already exists.
    assert tn.main(_argv(env, tmp_path / "out", trained.db)) == 1
    err = capsys.readouterr().err
    assert (
        f"adapter folder {trained.adapter} already exists" in err
        and "--overwrite" in err
        and "OVERWRITE=1" in err
    )
    # A fresh run (no --resume) into an output folder holding another run.
    argv = [a for a in _argv(env, trained.out, tmp_path / "db") if a != "--resume"]
    assert tn.main(argv) == 1
    assert "already holds a training run" in capsys.readouterr().err
    # The LoRA checkpoint cannot be resumed by a full-model run.
    assert tn.main([*_argv(env, trained.out, tmp_path / "db"), "MODEL.LORA.ENABLED", "False"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint of a LoRA run of adapter 'x'" in err and "full CAT-Seg fine-tuning run" in err
    # ... nor into another adapter.
    assert tn.main([*_argv(env, trained.out, tmp_path / "db"), "MODEL.LORA.RANK", "4"]) == 1
    assert "another LoRA setting (r: checkpoint 8 vs run 4)" in capsys.readouterr().err
    # An evaluation into the training run's own folder (it would replace its config.yaml).
    assert tn.main(_argv(env, trained.out, trained.db, "--eval-only")) == 1
    assert "holds a training run" in capsys.readouterr().err
    # Evaluating an adapter that does not exist.
    assert (
        tn.main([*_argv(env, tmp_path / "eval", trained.db, "--eval-only"), "MODEL.LORA.NAME", "nope"]) == 1
    )
    assert f"adapter folder {trained.db / 'nope'} does not exist" in capsys.readouterr().err
    assert tree_digest(trained.db) == adapter_before and tree_digest(trained.out) == out_before
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


def test_resume_refuses_a_foreign_checkpoint_kind(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    save_training_checkpoint(out, "model_0000004.pth", {"model": {}, "lora": None, "iteration": 4, "seed": 1})
    assert train_net().main(_argv(env, out, tmp_path / "db")) == 1
    assert "cannot be resumed into a LoRA run of adapter 'x'" in capsys.readouterr().err


def test_overwrite_replaces_an_existing_adapter(env: Env, tmp_path: Path) -> None:
    db = tmp_path / "db"
    (db / NAME).mkdir(parents=True)
    (db / NAME / "stale.txt").write_text("old adapter")
    assert train_net().main([*_argv(env, tmp_path / "out", db, "--overwrite", max_iter=1)]) == 0
    assert sorted(p.name for p in (db / NAME).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in db.iterdir()) == [NAME]


def test_missing_dataset_root_is_refused(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    argv = [
        a for a in _argv(env, tmp_path / "out", tmp_path / "db") if a not in ("--data-root", str(env.root))
    ]
    assert train_net().main(argv) == 1
    assert "DETECTRON2_DATASETS is not set" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_flag_parses_every_device_form(device: str) -> None:
    args = train_net().build_parser().parse_args(["--config-file", "c.yaml", "--device", device])
    assert args.device == device


# ids "device=...": a test id "gpu" would read as the gpu marker (tests/conftest.py skips those without CUDA)
@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cpu:0", "CUDA"], ids="device={}".format)
def test_device_flag_refuses_anything_else_as_a_usage_error(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_net().build_parser().parse_args(["--config-file", "c.yaml", "--device", device])
    assert exit_info.value.code == 2
    assert f"invalid device {device!r}: use auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["run_lora.sh", "eval_lora.sh", "run.sh", "eval.sh"])
def test_wrappers_print_usage_and_fail_without_three_arguments(env: Env, script: str) -> None:
    result = run_script(script, ["config.yaml", "1"], data_root=env.root)
    assert result.returncode == 1
    assert result.stderr.startswith(f"usage: sh {script} CONFIG NUM_GPUS OUTPUT_DIR")


def _corrupt_copy(env: Env, folder: Path, *, draw: int = 0) -> tuple[Path, Path]:
    """A copy of the dataset root in which the training label of sampler draw ``draw`` is a truncated PNG."""
    import shutil

    import numpy as np

    from cat_seg.config import load_config
    from cat_seg.data import load_records

    root = Path(shutil.copytree(env.root, folder / "data"))
    records = load_records("acdc-rain_sem_seg_train", root)
    order = np.random.default_rng([int(load_config(TINY_CONFIG).SEED), 0]).permutation(len(records))
    label = Path(records[order[draw]]["sem_seg_file_name"])  # TrainingSampler's first pass
    label.write_bytes(label.read_bytes()[:60])
    return root, label


def test_a_corrupt_label_is_found_before_the_first_step(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, label = _corrupt_copy(env, tmp_path)
    argv = _argv(env, tmp_path / "out", tmp_path / "db")
    argv[argv.index("--data-root") + 1] = str(root)
    assert train_net().main(argv) == 1
    err = capsys.readouterr().err
    assert "train_net.py: error: 1 dataset file(s) cannot be used" in err and str(label) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_corrupt_label_met_in_training_stops_with_one_message_and_keeps_the_work(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, label = _corrupt_copy(env, tmp_path, draw=2)  # in the second batch of 2
    out = tmp_path / "out"
    argv = _argv(env, out, tmp_path / "db", "--no-data-check")
    argv[argv.index("--data-root") + 1] = str(root)
    assert train_net().main(argv) == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("train_net.py: error:")]
    assert len(message) == 1 and str(label) in message[0] and "corrupt" in message[0], err
    assert "Traceback" not in err
    # Iteration 1 (0-based 0) finished; it is checkpointed, so --resume would continue at the bad batch.
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"


def test_a_spec_dataset_resolves_through_datasets_specs_and_its_classes_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DATASETS.SPECS [FILE]`` makes ``floods_sem_seg_train`` a known dataset (no dataset root needed); a
    class JSON other than the spec's is refused naming the file to set."""
    from cat_seg.data.synthetic import write_own_domain

    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    spec = write_own_domain(tmp_path / "own", num_train=2, num_val=1)
    tn = train_net()
    argv = [
        "--config-file", str(TINY_CONFIG), "--device", "cpu",
        "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", "",
        "DATASETS.TRAIN", "('floods_sem_seg_train',)", "DATASETS.TEST", "('floods_sem_seg_val',)",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown dataset .floods_sem_seg_val..*DATASETS.SPECS"):
        tn.plan_from_args(tn.build_parser().parse_args(argv))
    argv += ["DATASETS.SPECS", f"['{spec}']"]
    with pytest.raises(ValueError, match=r"3 classes of .*classes.json.*TEST_CLASS_JSON .*classes.json"):
        tn.plan_from_args(tn.build_parser().parse_args(argv))
    classes = str(spec.parent / "floods" / "classes.json")
    argv += ["MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", classes, "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", classes]
    plan = tn.plan_from_args(tn.build_parser().parse_args(argv))
    assert len(plan.train_records) == 2 and list(plan.test_records) == ["floods_sem_seg_val"]
    assert plan.cfg.DATASETS.SPECS == [str(spec)]
