"""What a new user hits (issue 15), through the CLI: unwritable folders, odd config files and images, kohya habits.

Every case is one paragraph on stderr, exit 2, no traceback, and where it can be, before any model loads.

Read-only folders are made honestly: these tests run as root, which ignores permission bits, so a folder is made
immutable with `chattr +i` (ext4, xfs, btrfs support it; root cannot create, delete or rename inside it). Where
`chattr` is missing or the filesystem refuses it, the test is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_reliability import config, loha, write_config
from test_train import tiny_raw

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[Path]:
    """`folder` made immutable (`chattr +i`): nothing can be created in it or removed from it, even by root."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: cannot make a read-only folder as root")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this filesystem refuses chattr +i: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from loha_train.training import recipe

    monkeypatch.setattr(recipe, "load_models", lambda *a, **k: pytest.fail("the model loaded before the error"))


# --- tracebacks that became errors -----------------------------------------------------------------------------


def test_config_file_that_is_not_utf8_names_the_file_the_byte_and_the_offset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# café\nmodel:\n  path: builtin:tiny-sd-random\n".encode("latin-1"))  # é is 0xe9 at offset 5
    status, out, err = loha([path], capsys)
    assert status == 2 and out == ""
    assert str(path) in err and "not UTF-8" in err and "0xe9" in err and "offset 5" in err and "line 1" in err


@pytest.mark.parametrize("dry_run", [False, True])
def test_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, dry_run: bool
) -> None:
    no_model_loads(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    path = write_config(tmp_path / "run.yaml", tiny_raw(locked / "out"))
    with immutable(locked):
        status, _, err = loha([path, *(["--dry-run"] if dry_run else [])], capsys)
    assert status == 2
    assert f"output.dir: cannot be written (its nearest existing parent {locked})" in err, err


def test_output_folder_under_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_model_loads(monkeypatch)
    (tmp_path / "afile").write_text("x")
    path = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path / "afile" / "out"))
    status, _, err = loha([path, "--dry-run"], capsys)
    assert status == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err, err


def test_overwrite_of_a_read_only_run_is_refused_before_rmtree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "checkpoints" / "step-000004" / "train_state.json").write_text("{}")
    (out / "run.safetensors").write_bytes(b"old")
    path = config(tmp_path)
    no_model_loads(monkeypatch)
    with immutable(out / "checkpoints"):
        status, _, err = loha([path, "--overwrite"], capsys)
    assert status == 2
    assert f"--overwrite must delete the old run's checkpoints and logs, but {out / 'checkpoints'}" in err, err
    assert (out / "checkpoints" / "step-000004" / "train_state.json").read_text() == "{}"


def test_read_only_data_folder_puts_the_latent_cache_under_loha_train_cache_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, builtin_cache: Path
) -> None:
    from loha_train.models.builtin import resolve_builtin

    images = tmp_path / "images"
    shutil.copytree(resolve_builtin("builtin:shapes"), images)
    path = config(tmp_path, data__path=str(images), data__cache_latents="disk", train__max_steps=1)
    with immutable(images):
        status, _, err = loha([path, "--dry-run"], capsys)
        assert status == 0, err
        said = caplog.text
        assert "the latent cache cannot go in the data folder" in said and str(builtin_cache / "data") in said
        status, _, err = loha([path], capsys)
    assert status == 0, err
    assert not (images / ".loha-cache").exists()
    assert list((builtin_cache / "data").rglob("*.safetensors")), "the latents were cached in the fallback"


# --- merge refuses to write a broken model ---------------------------------------------------------------------


@pytest.mark.parametrize("multiplier", ["nan", "inf", "-inf"])
def test_merge_rejects_a_non_finite_multiplier_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, multiplier: str
) -> None:
    from loha_train.models import loading

    monkeypatch.setattr(loading, "load_models", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "merged.safetensors"
    args = [
        "merge",
        "--base",
        "builtin:tiny-sd-random",
        "--adapter",
        str(tmp_path / "x.safetensors"),
        "--out",
        str(out),
    ]
    status, _, err = loha([*args, f"--multiplier={multiplier}"], capsys)
    assert status == 2 and "--multiplier must be a finite number" in err and not out.exists(), err


def test_dry_run_predicts_the_refusal_of_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tiny_raw(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.safetensors").write_bytes(b"a finished run's adapter")
    path = write_config(tmp_path / "run.yaml", {**raw, "output": {**raw["output"], "name": "run"}})
    no_model_loads(monkeypatch)
    status, _, err = loha([path, "--dry-run"], capsys)
    assert status == 2 and "already holds a finished run (run.safetensors)" in err, err


# --- small things a kohya user types ---------------------------------------------------------------------------


def test_version_prints_the_installed_distribution_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    status, out, _ = loha(["--version"], capsys)
    assert status == 0 and out.strip() == f"loha-train {version('loha-train')}"


def test_train_is_accepted_as_an_explicit_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path, train__learning_rate=1e-4)  # a bad config: the error shows which command read it
    status, _, err = loha(["train", path, "--dry-run"], capsys)
    assert status == 2 and err.startswith(f"loha-train train: error: invalid config {path}"), err
    assert loha([path, "--dry-run"], capsys)[2] == err  # the same as without `train`


@pytest.mark.parametrize(
    ("section", "kohya", "ours"),
    [
        ("train", "learning_rate", "train.lr"),
        ("network", "network_dim", "network.rank"),
        ("network", "network_alpha", "network.alpha"),
        ("train", "train_batch_size", "train.batch_size"),
        ("train", "max_train_steps", "train.max_steps"),
        ("train", "resolution", "data.resolution"),
        (None, "network_dim", "network.rank"),  # at the top level, as in a flat kohya TOML
    ],
)
def test_kohya_option_names_get_a_hint_to_our_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str | None, kohya: str, ours: str
) -> None:
    raw = tiny_raw(tmp_path / "out")
    if section is None:
        raw[kohya] = 16
    else:
        raw[section][kohya] = 16
    status, _, err = loha([write_config(tmp_path / "run.yaml", raw), "--dry-run"], capsys)
    where = f"{section}.{kohya}" if section else kohya
    assert status == 2 and f"{where}: unknown key; did you mean {ours}?" in err, err


def test_readme_shows_the_kohya_names_table_the_hint_consults() -> None:
    from loha_train.config.kohya_names import KOHYA_NAMES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for kohya, ours in KOHYA_NAMES.items():
        assert f"| `{kohya}` | `{ours}` |" in readme, kohya


def test_inspect_on_a_folder_says_so_and_lists_the_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "step-000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000010" / "adapter.safetensors").write_bytes(b"")
    status, _, err = loha(["inspect", tmp_path], capsys)
    assert status == 2 and f"{tmp_path} is a folder; inspect one of the adapters inside it" in err, err
    assert (
        str(tmp_path / "run.safetensors") in err
        and str(tmp_path / "checkpoints/step-000010/adapter.safetensors") in err
    )


def test_resume_from_a_path_that_does_not_exist_suggests_only_real_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_model_loads(monkeypatch)
    path, out = config(tmp_path), tmp_path / "out"
    status, _, err = loha([path, "--resume", tmp_path / "nope"], capsys)
    assert status == 2 and f"--resume {tmp_path / 'nope'}: does not exist" in err, err
    assert "holds no complete checkpoint: start the run without --resume" in err and "step-" not in err
    real = out / "checkpoints" / "step-000004"
    real.mkdir(parents=True)
    (real / "train_state.json").write_text("{}")
    (real / "adapter.safetensors").write_bytes(b"")
    (out / "checkpoints" / "step-000008").mkdir()  # incomplete: never suggested
    status, _, err = loha([path, "--resume", out / "checkpoints" / "step-000100"], capsys)
    assert status == 2 and f"Complete checkpoints of this run: {real};" in err and "step-000008" not in err, err


def test_a_caption_with_control_characters_warns_naming_the_file(tmp_path: Path, caplog) -> None:
    from PIL import Image

    from loha_train.config import DataConfig
    from loha_train.data import scan_dataset

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red \x1b[31mcircle\x00", encoding="utf-8")
    scan_dataset(DataConfig(path=str(tmp_path)))
    assert f"{tmp_path / 'a.txt'}: the caption holds control characters (U+0000, U+001B)" in caplog.text


def test_first_use_of_a_builtin_says_that_it_builds_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from loha_train.models.builtin import resolve_builtin

    with caplog.at_level(logging.INFO, logger="loha_train.models.builtin"):
        resolve_builtin("builtin:shapes", cache=tmp_path)
        resolve_builtin("builtin:shapes", cache=tmp_path)  # built: silent
    assert caplog.text.count("building builtin:shapes into") == 1, caplog.text


def test_readme_and_quickstart_config_state_the_same_time_on_two_cores() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    quickstart = (root / "configs" / "quickstart.yaml").read_text(encoding="utf-8")
    assert "a few minutes on two idle CPU cores" in readme and "a few minutes on two idle CPU cores" in quickstart
    assert "busy" in quickstart and "shared cores" in readme  # and say what it depends on
