"""Reliability through the CLI: bad config, data and models get one clear error (exit 2, no traceback) before
anything trains; NaN losses, full disks and interrupts lose nothing; resumes are refused when unsafe and never
unpickle code. Kills of a real process are in test_reliability_kill.py."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_train import tiny_raw

from loha_train import cli
from loha_train.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")


# --- helpers ---------------------------------------------------------------------------------------------------


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def config(tmp_path: Path, **sets: Any) -> Path:
    """A tiny training config (test_train.tiny_raw) written to tmp_path/run.yaml, output in tmp_path/out."""
    return write_config(tmp_path / "run.yaml", tiny_raw(tmp_path / "out", **sets))


def loha(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`loha-train ARGV` in this process: (exit status, stdout, stderr); a user error never shows a traceback."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # the progress bar redraws with \r
    return status, out, "\n".join(line for line in lines if not line.startswith("training:"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoints(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_same_adapter(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, builtin_cache: Path) -> Path:
    """An uninterrupted 8-step run (checkpoints every 2 steps): the result every faulty run must reproduce."""
    from accelerate.state import AcceleratorState

    tmp = tmp_path_factory.mktemp("reference")
    AcceleratorState._reset_state(True)
    assert cli.main([str(config(tmp, train__save_every_steps=2))]) == 0
    AcceleratorState._reset_state(True)
    return tmp / "out"


class Marker:
    """A pickle that, if ever unpickled by something other than a weights-only loader, creates a file."""

    path = ""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return exec, (f"open({self.path!r}, 'w').write('code ran')",)


def malicious_pickle(target: Path, marker: Path) -> None:
    Marker.path = str(marker)
    torch.save({"state": Marker()}, target)


# --- 1. bad config: every problem at once, by dotted key, before any model loads -----------------------------------

# One of each kind; a contradiction is checked once its section's values are valid (so no mistake counts twice).
BAD_CONFIG = {
    "model": {"path": "/no/such/model"},
    "network": {"rnak": 8, "rank": 0, "rank_dropout": 1.5},
    "data": {"path": "/no/such/images", "resolution": 100},
    "train": {"lr": -1e-4, "max_steps": 10, "batch_size": "two"},
    "sample": {"every_n_steps": 5},
    "output": {"dir": "out"},
}
BAD_CONFIG_PROBLEMS = [
    "model.path: does not exist: /no/such/model",
    "network.rnak: unknown key; did you mean network.rank?",
    "network.rank: must be >= 1, got 0",
    "network.rank_dropout: must be in [0, 1), got 1.5",
    "data.path: does not exist: /no/such/images",
    "data.resolution: must be a positive multiple of 8, got 100",
    "train.lr: must be > 0, got -0.0001",
    "train.batch_size: must be an integer, got 'two'",
    "sample.prompts: sample.every_n_steps/every_n_epochs is set but there are no prompts to sample",
    "output.name: must be a file name without / or \\, got 'a/b'",  # from --set
    "train.nan_polcy: unknown key (in --set); did you mean train.nan_policy?",
]


@pytest.mark.slow
def test_bad_config_lists_every_problem_through_the_real_cli(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", BAD_CONFIG)
    sets = ["--set", "output.name=a/b", "--set", "train.nan_polcy=skip"]
    done = subprocess.run(
        [sys.executable, "-m", "loha_train", str(path), *sets],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,  # output.dir `out` is relative
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert f"invalid config {path} ({len(BAD_CONFIG_PROBLEMS)} problems)" in done.stderr
    for problem in BAD_CONFIG_PROBLEMS:
        assert f"  - {problem}" in done.stderr.splitlines(), problem
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model:\n  path: builtin:tiny-sd-random\n network: {}\n", "YAML error at line 3, column 2"),
        ("train:\n  lr: [1e-4\noutput: {dir: out}\n", "YAML error at line 3, column 7"),
        ("train:\n  lr: 1e-4\n  lr: 2e-4\n", "duplicate key 'lr' (first at line 2)"),
    ],
)
def test_yaml_syntax_errors_give_line_and_column_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str, fragment: str
) -> None:
    from loha_train.training import recipe

    monkeypatch.setattr(recipe, "train", lambda *a, **k: pytest.fail("a bad config reached train()"))
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    status, out, err = loha([path], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"loha-train train: error: invalid config {path}") and fragment in err, err


def test_contradictions_and_paths_stop_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from loha_train.training import recipe

    monkeypatch.setattr(recipe, "train", lambda *a, **k: pytest.fail("a bad config reached train()"))
    path = config(tmp_path, data__random_crop=True, data__cache_latents="disk", model__path=str(tmp_path / "nope"))
    status, _, err = loha([path, "--dry-run"], capsys)
    assert status == 2
    assert "data.random_crop: latents are cached once per image" in err
    assert f"model.path: does not exist: {tmp_path / 'nope'}" in err


# --- 2. bad data: the error (or with data.skip_bad_images a warning and a count) names the file, up front ----------


def shapes_copy(tmp_path: Path) -> Path:
    from loha_train.models.builtin import resolve_builtin

    folder = tmp_path / "images"
    shutil.copytree(resolve_builtin("builtin:shapes"), folder, ignore=shutil.ignore_patterns(".*"))
    return folder


def _png(size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _metadata_folder(images: Path) -> str:
    pngs = sorted(p.name for p in images.glob("*.png"))
    lines = [json.dumps({"file_name": name, "text": "a shape"}) for name in pngs[:3]]
    lines.insert(1, '{"file_name": "' + pngs[3] + '", "text": ')  # a line cut short
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return "metadata.jsonl"


BAD_FILES: dict[str, tuple[Callable[[Path], str], str]] = {
    # case: (make the bad file in a copy of builtin:shapes and return its name, what the message says)
    "unreadable image": (lambda d: _write(d / "zz_noise.png", b"\x89PNG\r\n not really"), "not a readable image"),
    "truncated image": (
        lambda d: _write(d / "zz_cut.png", _half(d / "000_red_circle.png")),
        "truncated or corrupt image",
    ),
    "zero-byte file": (lambda d: _write(d / "zz_empty.png", b""), "empty file (0 bytes)"),
    "caption in latin-1": (
        lambda d: _write(d / "003_yellow_circle.txt", "café, yellow circle".encode("latin-1")),
        "not valid UTF-8 (byte 0xe9 at offset 3)",
    ),
    "image below the bucket minimum": (lambda d: _write(d / "zz_tiny.png", _png((16, 16))), "16x16 is too small"),
    "metadata.jsonl bad line": (_metadata_folder, "metadata.jsonl:2: not valid JSON"),
}


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_is_found_by_dry_run_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, case: str
) -> None:
    make, fragment = BAD_FILES[case]
    images = shapes_copy(tmp_path)
    bad = images / make(images)
    path = config(tmp_path, data__path=str(images))

    status, out, err = loha([path, "--dry-run"], capsys)
    assert status == 2 and out == ""
    assert f"{bad}" in err and fragment in err, err
    assert "set data.skip_bad_images: true to skip them" in err

    status, out, _ = loha([path, "--dry-run", "--set", "data.skip_bad_images=true"], capsys)
    assert status == 0
    assert "1 bad file(s) skipped" in out  # the plan
    assert any(str(bad) in r.getMessage() and fragment in r.getMessage() for r in caplog.records), caplog.text
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_empty_dataset_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    status, _, err = loha([config(tmp_path, data__path=str(tmp_path / "empty")), "--dry-run"], capsys)
    assert status == 2 and f"data.path: no images found in {tmp_path / 'empty'}" in err


def test_bad_data_stops_a_run_before_its_first_step_and_skipped_files_are_counted_in_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = shapes_copy(tmp_path)
    (images / "zz_empty.png").write_bytes(b"")
    (images / "zz_cut.png").write_bytes(_half(images / "001_green_square.png"))
    path = config(tmp_path, data__path=str(images), train__max_steps=2)

    status, _, err = loha([path], capsys)
    assert status == 2 and "found 2 problems in the dataset" in err
    assert not (tmp_path / "out").exists(), "nothing was trained or written"

    status, out, _ = loha([path, "--set", "data.skip_bad_images=true"], capsys)
    assert status == 0 and "2 bad file(s) skipped" in out
    rows = read_metrics(tmp_path / "out/logs/metrics.jsonl")
    assert rows[0] == {"step": 0, "skipped_bad_files": 2}
    assert [r["step"] for r in rows[1:]] == [1, 2]


# --- 3. bad model: one error naming the file and what was expected -----------------------------------------------


def _fake_ldm(path: Path, half: bool = False, in_channels: int = 4) -> None:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, in_channels, 3, 3)}, str(path))
    if half:
        path.write_bytes(_half(path))


def _foreign_folder(path: Path) -> None:
    path.mkdir()
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (path / "model_index.json").write_text(json.dumps(index), encoding="utf-8")


BAD_MODELS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # case: (file name, how to make it, what the message says)
    "folder without model_index.json": ("some-folder", lambda p: p.mkdir(), "not a diffusers model folder"),
    "unsupported architecture": ("flux", _foreign_folder, "unsupported architecture 'FluxPipeline'"),
    "unsupported single file": (
        "inpaint.safetensors",
        lambda p: _fake_ldm(p, in_channels=9),
        "UNet with 9 input channels (inpainting or edit model); expected 4",
    ),
    "not a checkpoint file": ("model.bin", lambda p: p.write_bytes(b"\0" * 64), "expected a diffusers folder, a .safe"),
    "a LoRA, not a checkpoint": (
        "lora.safetensors",
        lambda p: save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, p),
        "no model.diffusion_model.input_blocks.0.0.weight key",
    ),
    "truncated .safetensors": ("cut.safetensors", lambda p: _fake_ldm(p, half=True), "it may be truncated or corrupt"),
    "truncated .ckpt": (
        "cut.ckpt",
        lambda p: (torch.save({"state_dict": {"w": torch.zeros(1000)}}, p), p.write_bytes(_half(p))),
        "not a readable .ckpt",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    name, make, fragment = BAD_MODELS[case]
    model = tmp_path / name
    make(model)
    status, out, err = loha([config(tmp_path, model__path=str(model)), "--dry-run"], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"loha-train train: error: {model}") and fragment in err, err
    assert len(err.strip().splitlines()) == 1, "one paragraph"


def test_a_ckpt_that_pickles_code_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    malicious_pickle(model, marker)
    status, _, err = loha([config(tmp_path, model__path=str(model)), "--dry-run"], capsys)
    assert status == 2 and f"{model}: this .ckpt pickles Python objects" in err
    assert not marker.exists()


# --- 4. faults during a run: NaN, a full disk, interrupts ----------------------------------------------------------


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """Make the loss of the given optimizer steps NaN (one micro-batch per step in these configs)."""
    from loha_train.training import step

    original, calls = step.diffusion_loss, [0]

    def diffusion_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls[0] in steps else loss

    monkeypatch.setattr(step, "diffusion_loss", diffusion_loss)


@pytest.mark.parametrize(
    ("nan_step", "where"),
    [
        (1, "training stopped and no checkpoint was written yet. Lower train.lr"),
        (3, "training stopped and the last good checkpoint is {out}/checkpoints/step-000002 (continue from it"),
    ],
)
def test_nan_loss_stops_with_the_last_good_checkpoint_intact(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    reference: Path,
    nan_step: int,
    where: str,
) -> None:
    out, path = tmp_path / "out", config(tmp_path, train__save_every_steps=2)
    nan_loss_at(monkeypatch, {nan_step})
    status, _, err = loha([path], capsys)
    assert status == 2
    assert err.startswith(f"loha-train train: error: The loss became nan at step {nan_step}; ")
    assert where.format(out=out) in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "loha.safetensors").exists()
    assert checkpoints(out) == (["step-000002"] if nan_step == 3 else [])
    if nan_step == 3:  # the good checkpoint resumes into exactly the uninterrupted run
        monkeypatch.undo()
        assert loha([path, "--resume", "latest"], capsys)[0] == 0
        assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")


def test_nan_policy_skip_skips_the_step_and_counts_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    nan_loss_at(monkeypatch, {3, 5})
    status, _, _ = loha([config(tmp_path, train__nan_policy="skip")], capsys)
    assert status == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping this step" in r.getMessage()]
    assert skipped == [f"loss is nan at step {s}: skipping this step (train.nan_policy: skip)" for s in (3, 5)]
    state = json.loads((out / "checkpoints/step-000008/train_state.json").read_text())
    assert state["extra"]["skipped_steps"] == 2
    from safetensors import safe_open

    with safe_open(str(out / "loha.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["loha_train.run"])["stats"]["skipped_steps"] == 2
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())  # noqa: SIM118


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_weights_poisoned_by_an_overflowing_step_are_never_checkpointed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from loha_train.training import step

    original, calls = step.diffusion_loss, [0]

    def diffusion_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        loss = original(*args, **kwargs)
        return _NanGradient.apply(loss) if calls[0] == 4 else loss  # step 4: finite loss, NaN weights after it

    monkeypatch.setattr(step, "diffusion_loss", diffusion_loss)
    out = tmp_path / "out"
    status, _, err = loha([config(tmp_path, train__save_every_steps=2)], capsys)
    assert status == 2 and "holds NaN or inf values (an optimizer step overflowed), so this checkpoint" in err, err
    assert checkpoints(out) == ["step-000002"] and not (out / "loha.safetensors").exists()


DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


def _fail_checkpoint_adapter(monkeypatch: pytest.MonkeyPatch, before: dict[str, Any]) -> None:
    """safetensors reports a full disk as a SafetensorError; fail the second checkpoint's adapter file."""
    from safetensors import SafetensorError

    from loha_train.training import checkpoint

    original, calls = checkpoint.save_file, [0]

    def save_file(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            before["step-000002"] = snapshot(Path(filename).parent.parent / "step-000002")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def _fail_checkpoint_optimizer(full: bool) -> Callable[[pytest.MonkeyPatch, dict[str, Any]], None]:
    """torch.save reports a full disk as a bare RuntimeError; tell it from other failures by the space left."""

    def install(monkeypatch: pytest.MonkeyPatch, before: dict[str, Any]) -> None:
        import accelerate.checkpointing

        original, calls = accelerate.checkpointing.save, [0]

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            calls[0] += 1
            if calls[0] == 3:  # optimizer.bin of the second checkpoint (optimizer, scheduler per checkpoint)
                before["step-000002"] = snapshot(Path(f).parent.parent / "step-000002")
                if full:
                    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            original(obj, f, *args, **kwargs)

        monkeypatch.setattr(accelerate.checkpointing, "save", save)

    return install


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        (_fail_checkpoint_adapter, 1, "no space left on the device while writing {out}/checkpoints/step-000004. "),
        (_fail_checkpoint_optimizer(full=True), 1, "no space left on the device while writing {out}/checkpoints/"),
        (
            _fail_checkpoint_optimizer(full=False),
            2,
            "error: Could not write checkpoint {out}/checkpoints/step-000004 (RuntimeError: [enforce fail at ",
        ),
    ],
    ids=["adapter file, disk full", "optimizer.bin, disk full", "optimizer.bin, other failure"],
)
def test_a_failed_checkpoint_write_is_one_clear_error_and_replaces_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[pytest.MonkeyPatch, dict[str, Any]], None],
    status: int,
    message: str,
) -> None:
    out, before = tmp_path / "out", {}
    fault(monkeypatch, before)
    got, _, err = loha([config(tmp_path, train__save_every_steps=2)], capsys)
    assert got == status and message.format(out=out) in err, err
    assert snapshot(out / "checkpoints/step-000002") == before["step-000002"], "the earlier checkpoint changed"
    assert checkpoints(out) == ["step-000002"], "a partial checkpoint was left"
    assert not (out / "loha.safetensors").exists()


def test_a_full_disk_during_the_final_export_keeps_the_previous_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, reference: Path
) -> None:
    from loha_train.fileformat import adapter_io

    out, path = tmp_path / "out", config(tmp_path, train__save_every_steps=2)
    assert loha([path, "--set", "train.max_steps=4"], capsys)[0] == 0
    previous = (out / "loha.safetensors").read_bytes()

    publish = adapter_io._publish

    def fail_on_the_adapter(tmp: Path, final: Path) -> None:
        if final.name == "loha.safetensors":
            raise DISK_FULL
        publish(tmp, final)

    monkeypatch.setattr(adapter_io, "_publish", fail_on_the_adapter)
    status, _, err = loha([path, "--resume", "latest"], capsys)  # trains on to 8 steps
    assert status == 1 and f"no space left on the device while writing {out / 'loha.safetensors'}. " in err, err
    assert (out / "loha.safetensors").read_bytes() == previous
    assert sorted(p.name for p in out.glob("loha.safetensors*")) == ["loha.safetensors"], "no temporary left"

    monkeypatch.undo()
    assert loha([path, "--resume", "latest"], capsys)[0] == 0  # nothing left to train: exports again
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")


class _DiskFillsUp:
    """A file whose write of the step-5 line stores half of it, then fails as a full disk does."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def __enter__(self) -> _DiskFillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, text: str) -> int:
        if text.startswith('{"step": 5,'):
            self.file.write(text[: len(text) // 2])
            raise DISK_FULL
        return self.file.write(text)


def test_a_full_disk_while_logging_leaves_a_run_that_resumes_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, reference: Path
) -> None:
    out, path = tmp_path / "out", config(tmp_path, train__save_every_steps=2)
    original = Path.open

    def open_(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = original(self, mode, *args, **kwargs)
        return _DiskFillsUp(file) if self.name == "metrics.jsonl" and mode == "a" else file

    monkeypatch.setattr(Path, "open", open_)
    status, _, err = loha([path], capsys)
    assert status == 1 and f"while writing {out / 'logs/metrics.jsonl'}. " in err, err
    assert checkpoints(out) == ["step-000002", "step-000004"]

    monkeypatch.undo()
    assert loha([path, "--resume", "latest"], capsys)[0] == 0  # the torn line is dropped on resume
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")
    rows = read_metrics(out / "logs/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows == read_metrics(reference / "logs/metrics.jsonl")


def test_a_full_disk_while_saving_samples_names_the_file_and_leaves_no_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    out, original = tmp_path / "out", Image.Image.save
    path = config(tmp_path, sample__prompts=["a red circle"], sample__steps=1)

    def save(image: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if str(out) in str(fp):
            raise DISK_FULL
        original(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    status, _, err = loha([path], capsys)
    assert status == 1 and f"while writing {out / 'samples/step-000000-00.png'}. " in err, err
    assert [p.name for p in (out / "samples").iterdir()] == []


def test_a_full_disk_while_caching_latents_is_reported_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import SafetensorError

    from loha_train.data import caches

    def save_file(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(caches, "save_file", save_file)
    images = shapes_copy(tmp_path)
    status, _, err = loha([config(tmp_path, data__path=str(images), data__cache_latents="disk")], capsys)
    assert status == 1 and "loha-train: error: no space left on the device while writing a file (" in err, err
    assert not list((images / ".loha-cache").rglob("*.tmp")), "a partial cache entry was left"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_exits_128_plus_signum_and_prints_a_resume_command_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, reference: Path, signum: int
) -> None:
    from loha_train.training import metrics

    out, path = tmp_path / "out", config(tmp_path, train__save_every_steps=2)
    original = metrics.MetricsLog.scalars

    def scalars(self: Any, step: int, values: dict[str, float]) -> None:
        original(self, step, values)
        if step == 3:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(metrics.MetricsLog, "scalars", scalars)
    status, _, err = loha([path, "--set", "train.lr=1e-3"], capsys)
    assert status == 128 + signum
    name = signal.Signals(signum).name
    assert f"stopped at step 3 (interrupted by {name} at step 3); a checkpoint was written to " in err
    assert checkpoints(out) == ["step-000002", "step-000003"]
    command = err.split("Resume with:\n", 1)[1].strip()
    assert command == f"loha-train {path} --set train.lr=1e-3 --resume latest"

    monkeypatch.undo()
    assert loha(shlex.split(command)[1:], capsys)[0] == 0
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")
    assert read_metrics(out / "logs/metrics.jsonl") == read_metrics(reference / "logs/metrics.jsonl")


def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    from loha_train.training import recipe

    monkeypatch.setattr(recipe, "load_models", interrupted)
    status, _, err = loha([config(tmp_path)], capsys)
    assert status == 130 and err == "loha-train: interrupted\n"
    assert not (tmp_path / "out").exists()


# --- 5. resume safety ----------------------------------------------------------------------------------------------


def _changed_model(tmp_path: Path) -> list[str]:
    from loha_train.models.builtin import resolve_builtin

    copy = tmp_path / "other-model"
    shutil.copytree(resolve_builtin("builtin:tiny-sd-random"), copy)
    return ["--set", f"model.path={copy}"]


def _changed_image(tmp_path: Path) -> list[str]:
    from PIL import Image

    image = tmp_path / "images/000_red_circle.png"
    Image.new("RGB", (64, 64), "blue").save(image)
    return []


CHANGES: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    # case: (change the files or the config, the differences the refusal names)
    "rank": (lambda _: ["--set", "network.rank=8"], ["network.rank: checkpoint has 4, config has 8"]),
    "targets": (
        lambda _: ["--set", "network.exclude=[attn2]"],
        ["network.exclude: checkpoint has [], config has ['attn2']"],
    ),
    "model": (_changed_model, ["model.path: checkpoint has 'builtin:tiny-sd-random', config has "]),
    "dataset contents": (_changed_image, ["data.content_sha256: checkpoint has "]),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_resume_with_changed_settings_is_refused_naming_the_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    change, named = CHANGES[case]
    out = tmp_path / "out"
    path = config(tmp_path, data__path=str(shapes_copy(tmp_path)), train__max_steps=4, train__save_every_steps=2)
    assert loha([path, "--set", "train.max_steps=2"], capsys)[0] == 0
    before = snapshot(out)
    status, _, err = loha([path, "--resume", "latest", *change(tmp_path)], capsys)
    assert status == 2 and f"Cannot resume from {out}/checkpoints/step-000002: settings that decide" in err
    assert all(difference in err for difference in named), err
    assert snapshot(out) == before


def test_a_checkpoint_of_another_version_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loha_train import __version__

    out, path = tmp_path / "out", config(tmp_path, train__max_steps=1)
    assert loha([path], capsys)[0] == 0
    state_file = out / "checkpoints/step-000001/train_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "version": "9.0.0", "a_future_field": 1}))
    status, _, err = loha([path, "--resume", "latest", "--set", "train.max_steps=2"], capsys)
    assert status == 2
    assert f"{out}/checkpoints/step-000001 was written by loha-train 9.0.0; this is {__version__}." in err


def test_a_finished_run_is_kept_unless_overwrite_and_overwrite_starts_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, path = tmp_path / "out", config(tmp_path, train__save_every_steps=2, train__max_steps=6)
    assert loha([path], capsys)[0] == 0
    before = snapshot(out)
    status, _, err = loha([path, "--set", "train.lr=5e-4"], capsys)
    assert status == 2 and "already holds a finished run (loha.safetensors). Use `--resume latest`" in err
    assert snapshot(out) == before

    status, _, err = loha([path, "--resume", "latest", "--overwrite"], capsys)
    assert status == 2 and "--resume continues the run in" in err and snapshot(out) == before

    # --overwrite: a new run whose interruption must never resume from the old run's newer checkpoints
    assert loha([path, "--overwrite", "--set", "train.max_steps=2"], capsys)[0] == 0
    assert checkpoints(out) == ["step-000002"], "the old run's checkpoints are gone"
    assert [r["step"] for r in read_metrics(out / "logs/metrics.jsonl")] == [1, 2]
    assert (out / "loha.safetensors").read_bytes() != before["loha.safetensors"]


def test_resume_latest_with_only_a_partial_checkpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    (out / "checkpoints/.step-000004.tmp").mkdir(parents=True)
    (out / "checkpoints/.step-000004.tmp/adapter.safetensors").write_bytes(b"half")
    status, _, err = loha([config(tmp_path), "--resume", "latest"], capsys)
    assert status == 2
    assert f"no complete checkpoint under {out / 'checkpoints'} (only .step-000004.tmp, left incomplete" in err


def test_resume_from_a_partial_folder_by_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "out/checkpoints/.step-000004.tmp"
    partial.mkdir(parents=True)
    (partial / "train_state.json").write_text("{}")
    status, _, err = loha([config(tmp_path), "--resume", partial], capsys)
    assert status == 2 and f"--resume {partial}: a partial checkpoint left by a run that was killed" in err


def test_resuming_an_older_checkpoint_replaces_the_later_ones_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    out, path = tmp_path / "out", config(tmp_path, train__save_every_steps=2)
    assert loha([path], capsys)[0] == 0
    assert loha([path, "--resume", out / "checkpoints/step-000004"], capsys)[0] == 0  # saves 6 and 8 again
    assert checkpoints(out) == ["step-000004", "step-000006", "step-000008"]
    assert snapshot(out / "checkpoints") == snapshot(reference / "checkpoints")
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")


def test_leftovers_of_killed_writes_are_ignored_then_cleaned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    out, path = tmp_path / "out", config(tmp_path, train__save_every_steps=2)
    assert loha([path, "--set", "train.max_steps=2"], capsys)[0] == 0
    leftovers = [
        out / "checkpoints/.step-000003.tmp/optimizer.bin",  # a kill while writing a checkpoint
        out / "checkpoints/.step-000001.deleting/adapter.safetensors",  # a kill while rotating
        out / "loha.safetensors.tmp-999999999",  # a kill while exporting (no such process)
    ]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"partial")
    assert loha([path, "--resume", "latest"], capsys)[0] == 0
    assert checkpoints(out) == ["step-000004", "step-000006", "step-000008"], "partial folders were not removed"
    assert sorted(p.name for p in out.glob("loha.safetensors*")) == ["loha.safetensors"]
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")


# --- 6. loading is safe: checkpoint files are never unpickled beyond tensors ----------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("optimizer.bin", "holds a state file with Python objects besides tensors; loha-train never unpickles"),
        ("scheduler.bin", "holds a state file with Python objects besides tensors; loha-train never unpickles"),
        ("custom_checkpoint_0.pkl", "could not be loaded (RuntimeError: Number of custom checkpoints"),
    ],
)
def test_a_checkpoint_state_file_that_pickles_code_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, reason: str
) -> None:
    out, path, marker = tmp_path / "out", config(tmp_path, train__max_steps=2), tmp_path / "code-ran"
    assert loha([path, "--set", "train.max_steps=1"], capsys)[0] == 0
    malicious_pickle(out / "checkpoints/step-000001" / name, marker)
    status, _, err = loha([path, "--resume", "latest"], capsys)
    assert status == 2 and f"Checkpoint {out}/checkpoints/step-000001 {reason}" in err, err
    assert not marker.exists()


def test_random_states_that_pickle_code_do_not_run_and_the_resume_stays_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    out, path, marker = tmp_path / "out", config(tmp_path, train__save_every_steps=2), tmp_path / "code-ran"
    assert loha([path, "--set", "train.max_steps=2"], capsys)[0] == 0
    malicious_pickle(out / "checkpoints/step-000002/random_states_0.pkl", marker)
    assert loha([path, "--resume", "latest"], capsys)[0] == 0  # accelerate skips unreadable RNG states
    assert not marker.exists()
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")  # RNGs are reseeded per step


def test_loading_code_only_uses_weights_only_loaders() -> None:
    """Every torch.load in loha_train passes weights_only=True; nothing calls pickle.load(s) or unsafe YAML."""
    import ast

    import loha_train

    for source in Path(loha_train.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            where = f"{source.name}:{node.lineno}"
            if node.func.attr == "load" and owner == "torch":
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert flags.get("weights_only") == "True", where
            assert not (owner in ("pickle", "dill", "joblib") and node.func.attr.startswith("load")), where
            assert node.func.attr not in ("unsafe_load", "full_load"), where
            if owner == "yaml" and node.func.attr == "load":
                assert "Loader" in {k.arg for k in node.keywords}, where
