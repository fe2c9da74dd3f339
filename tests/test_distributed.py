"""Two CPU processes (gloo) under `accelerate launch`: the adapter of one process, one set of files, resume."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loha_train.training.metrics import read_metrics


def _can_launch() -> bool:
    return (
        importlib.util.find_spec("accelerate.commands.launch") is not None
        and torch.distributed.is_available()
        and torch.distributed.is_gloo_available()
    )


pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")
needs_launcher = pytest.mark.skipif(not _can_launch(), reason="needs accelerate's launcher and torch.distributed/gloo")

CHECKPOINT_FILES = {"adapter.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "train_state.json"}


def raw_config(out: Path, **train: Any) -> dict[str, Any]:
    """The tiny model with everything that draws randomness: caption shuffling and dropout, rank and module
    dropout, a trained text encoder (a second DDP-wrapped model); three buckets, so the two processes often hold
    batches of different shapes at the same step (which DDP does not mind: it averages gradients, not batches)."""
    return {
        "model": {"path": "builtin:tiny-sd-random"},
        "network": {
            "preset": "full",
            "rank": 4,
            "alpha": 2,
            "rank_dropout": 0.2,
            "module_dropout": 0.1,
            "train_text_encoder": True,
        },
        "data": {
            "path": "builtin:shapes",
            "resolution": 64,
            "bucket_min_side": 32,
            "bucket_max_side": 128,
            "bucket_step": 16,
            "cache_latents": "memory",
            "shuffle_captions": True,
            "caption_dropout": 0.2,
        },
        "train": {"max_steps": 8, "batch_size": 1, "lr": 1e-3, "text_encoder_lr": 5e-4, "save_every_steps": 4, **train},
        "output": {"dir": str(out)},
    }


def train_here(raw: dict[str, Any], resume: str | None = None) -> None:
    """One process, in this interpreter."""
    from accelerate.state import AcceleratorState

    from loha_train.config import config_from_dict
    from loha_train.training.recipe import train

    AcceleratorState._reset_state(True)
    train(config_from_dict(raw), resume=resume, echo=lambda _: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(raw: dict[str, Any], *args: str, script: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of two CPU processes of `python -m loha_train CONFIG *args` (or of `script`)."""
    config = Path(raw["output"]["dir"]).parent / f"{Path(raw['output']['dir']).name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    # accelerate starts several CPU processes only through its multi-GPU (torchrun) launcher with
    # ACCELERATE_USE_CPU; `--cpu --num_processes 2` alone would start one process (it expects mpirun)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    target = [str(script)] if script else ["-m", "loha_train"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # two processes on a few cores: more threads each slow both down many times
        "ACCELERATE_USE_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HOME": str(config.parent / "hf-home"),  # no accelerate default_config.yaml of the machine's user
    }
    return [*launcher, *target, str(config), *args], env


def launch(
    raw: dict[str, Any], *args: str, script: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    command, env = launch_command(raw, *args, script=script)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def tree(out: Path) -> set[str]:
    """Every file and folder under `out` (hidden ones included: a leftover temporary folder must show)."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*")}


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]


def adapter_at(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "adapter.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-4) -> None:
    """Equal up to float rounding: DDP sums gradients across processes in another order than accumulation does
    (differences of ~1e-5 after a few Adam steps; a missed gradient sync or other noise differs by ~1e-2)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, builtin_cache: Path) -> Path:
    """One process, batch 1 x accumulation 2 (the same global batch as 2 processes x batch 1), 8 steps."""
    out = tmp_path_factory.mktemp("one-process") / "out"
    train_here(raw_config(out, gradient_accumulation=2))
    return out


@needs_launcher
def test_two_processes_train_the_one_process_adapter_and_write_one_set_of_files(
    tmp_path: Path, reference: Path
) -> None:
    out = tmp_path / "two"
    first = launch(raw_config(out, max_steps=4))
    assert first.returncode == 0, first.stderr[-3000:]
    # rank 0 alone wrote: one events file, each step logged once, one checkpoint (with each rank's RNG state)
    events = {f for f in tree(out) if f.startswith("logs/events.out.tfevents")}
    assert len(events) == 1
    assert tree(out) - events == {
        "loha.safetensors",
        "config.yaml",
        "loss.png",
        "logs",
        "logs/metrics.jsonl",
        "checkpoints",
        "checkpoints/step-000004",
        *(f"checkpoints/step-000004/{name}" for name in {*CHECKPOINT_FILES, "random_states_1.pkl"}),
    }
    assert steps_logged(out) == [1, 2, 3, 4]
    assert first.stdout.count("loha-train plan") == 1 and first.stdout.count("wrote ") == 1
    assert "processes   2" in first.stdout and "= 1 process x 2 accumulation" in first.stdout
    # the same samples, noise and dropout per step as one process accumulating two micro-batches
    assert losses(out) == pytest.approx(losses(reference)[:4], rel=1e-5)
    assert_same_adapter(adapter_at(out, 4), adapter_at(reference, 4))
    state = json.loads((out / "checkpoints/step-000004/train_state.json").read_text())
    assert (state["world_size"], state["batch_in_epoch"], state["effective_batch"]) == (2, 4, 2)

    # one process resumes the two-process checkpoint (accumulating 2 to keep the effective batch)
    alone = tmp_path / "then-one"
    shutil.copytree(out / "checkpoints", alone / "checkpoints")
    train_here(raw_config(alone, gradient_accumulation=2), resume="latest")
    assert_same_adapter(adapter_at(alone, 8), adapter_at(reference, 8))

    # two processes resume their own checkpoint and finish as the uninterrupted one-process run did
    second = launch(raw_config(out), "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert steps_logged(out) == list(range(1, 9))
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_adapter(adapter_at(out, 8), adapter_at(reference, 8))
    final, expected = load_file(str(out / "loha.safetensors")), load_file(str(reference / "loha.safetensors"))
    assert_same_adapter(final, expected, tol=1e-3)  # the exported file is saved in fp16 by default
    assert len({f for f in tree(out) if f.startswith("logs/events.out.tfevents")}) == 2  # one per launch
    assert not [f for f in tree(out) if Path(f).name.startswith(".")], "a temporary file or folder was left"


@needs_launcher
def test_two_processes_resume_a_one_process_checkpoint(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "from-one"
    shutil.copytree(reference / "checkpoints" / "step-000004", out / "checkpoints" / "step-000004")
    # 1 process x accumulation 2 -> 2 processes x accumulation 1: the same effective batch and global batches
    done = launch(raw_config(out, gradient_accumulation=1), "--resume", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 -> 2 processes" in done.stderr and "see the batches and noise an uninterrupted run would" in done.stderr
    assert steps_logged(out) == [5, 6, 7, 8]
    assert_same_adapter(adapter_at(out, 8), adapter_at(reference, 8))
    state = json.loads((out / "checkpoints/step-000008/train_state.json").read_text())
    assert (state["world_size"], state["step"]) == (2, 8)


FAILING_RANK = """
import os, sys
import loha_train.training.session as session
real, calls = session.micro_step, []
def micro_step(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("injected failure on rank 1")
    return real(*args, **kwargs)
session.micro_step = micro_step
from loha_train.cli import main
sys.exit(main())
"""


@needs_launcher
def test_a_failing_rank_stops_the_launch_with_an_error(tmp_path: Path) -> None:
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "out"
    done = launch(raw_config(out), script=script, timeout=180)  # rank 0 must not wait for rank 1 forever
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stderr
    assert not (out / "loha.safetensors").exists() and not (out / "checkpoints").exists()


@needs_launcher
def test_a_signal_to_one_rank_stops_both_at_the_same_step_with_one_checkpoint(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")  # accelerate's dependency
    out = tmp_path / "out"
    command, env = launch_command(raw_config(out, max_steps=100_000, save_every_steps=None))
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(steps_logged(out)) < 3:  # training is under way
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "loha_train" in p.cmdline()]
        [rank1] = [p for p in ranks if p.environ().get("RANK") == "1"]
        rank1.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert stderr.count("loha-train: stopped at step") == 1, stderr[-3000:]  # printed by rank 0 only
    [checkpoint] = (out / "checkpoints").iterdir()
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == steps_logged(out)[-1]  # rank 0 stopped where rank 1 did
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert not (out / "loha.safetensors").exists()


# --- the pieces, in one process ----------------------------------------------------------------------------------


def test_plan_shows_the_processes_and_how_they_relate_to_one_process(tmp_path: Path) -> None:
    from loha_train.config import config_from_dict
    from loha_train.training.plan import OutputPaths, format_plan, make_plan

    cfg = config_from_dict(raw_config(tmp_path, gradient_accumulation=3))
    text = format_plan(cfg, make_plan(cfg, 8, 2), OutputPaths(tmp_path, "loha"), model="m", adapters={}, data="d")
    assert "processes   2 (data parallel" in text
    assert "1 per process x 3 accumulation x 2 process(es) = 6 per optimizer step" in text
    assert "= 1 process x 6 accumulation" in text and "never scaled automatically" in text
    alone = format_plan(cfg, make_plan(cfg, 8, 1), OutputPaths(tmp_path, "loha"), model="m", adapters={}, data="d")
    assert "processes   1\n" in alone and "scaling" not in alone


@pytest.mark.parametrize(
    ("saved", "saved_world", "world", "expected"),
    [
        ((4, 0, 8), 1, 2, (4, 0, 4)),  # 8 global batches done, 4 each on two processes
        ((4, 0, 4), 2, 1, (4, 0, 8)),
        ((3, 0, 3), 1, 2, (3, 0, 1)),  # 3 global batches: rounded down, batch 2 is seen again
        ((9, 1, 7), 2, 1, (9, 2, 0)),  # the whole epoch was consumed: the next one starts
    ],
)
def test_a_position_moves_to_another_number_of_processes(
    saved: tuple[int, int, int], saved_world: int, world: int, expected: tuple[int, int, int]
) -> None:
    from loha_train.training.plan import Position, rescale_position

    batches_per_epoch = 14 // world
    assert rescale_position(Position(*saved), saved_world, world, batches_per_epoch) == Position(*expected)


def test_an_epoch_based_run_resumed_on_more_processes_still_trains_the_configured_epochs(tmp_path: Path) -> None:
    from loha_train.config import config_from_dict
    from loha_train.training.plan import Position, make_plan

    raw = raw_config(tmp_path)
    del raw["train"]["max_steps"]
    cfg = config_from_dict({**raw, "train": {**raw["train"], "epochs": 2}})
    assert make_plan(cfg, 16, 1).total_steps == 32
    # half of epoch 0 done by one process (8 steps); two processes do 4 steps each for the rest of it, then 8
    assert make_plan(cfg, 8, 2, Position(8, 0, 4)).total_steps == 8 + 4 + 8
    assert make_plan(cfg, 8, 2, Position(32, 2, 0)).total_steps == 32  # finished: nothing left to do


class _Process:
    """What _fill_latents needs of an Accelerator, for one of two threads standing in for two processes."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self._barrier = rank, 2, barrier
        self.is_main_process = rank == 0

    def wait_for_everyone(self) -> None:
        self._barrier.wait()


class _Encoder:
    """A stand-in VAE (8x pooling to 4 channels) that counts the images it encodes."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_each_process_encodes_only_its_shard_of_the_latents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    import accelerate.utils

    from loha_train.config import DataConfig
    from loha_train.data import ImageDataset, LatentCache, check_images, scan_dataset
    from loha_train.models.builtin import resolve_builtin
    from loha_train.training import data_pipeline

    cfg = DataConfig(path=str(resolve_builtin("builtin:shapes")), resolution=64, bucket_min_side=32, bucket_step=32)
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    entries = ImageDataset(index.train, cfg, seed=0).cache_entries()
    entries = entries + entries[:3]  # repeated entries are encoded once
    barrier, posted = threading.Barrier(2, timeout=60), {}

    def gather_object(obj: list[Any]) -> list[Any]:  # accelerate's, between the two threads
        posted[threading.current_thread().name] = obj
        barrier.wait()
        return [x for name in sorted(posted) for x in posted[name]]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    monkeypatch.setattr(data_pipeline, "vae_encode", lambda encoder, pixels: encoder(pixels))
    encoders = [_Encoder(), _Encoder()]
    folder = tmp_path / "cache" if mode == "disk" else None
    caches = [LatentCache(mode, "vae", folder) for _ in range(2)]  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def process(rank: int) -> None:
        try:
            data_pipeline._fill_latents(encoders[rank], _Process(rank, barrier), caches[rank], entries)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,), name=f"rank{rank}") for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [e.images for e in encoders] == [8, 8]  # 16 distinct images, each encoded by one process only
    for cache in caches:  # and every process can read every latent
        assert all(cache.get(item, plan).shape[0] == 4 for item, plan in entries)


def test_deepspeed_is_refused_before_anything_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loha_train.training.guards import TrainingError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(TrainingError, match=r"DeepSpeed is not supported.*--multi_gpu"):
        train_here(raw_config(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_launch_that_would_train_independent_copies_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loha_train.training.guards import TrainingError

    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's, while accelerate set up one process (a CPU box, no --cpu)
    with pytest.raises(TrainingError, match=r"launched as 2 processes .* ACCELERATE_USE_CPU=1"):
        train_here(raw_config(tmp_path / "out"))
