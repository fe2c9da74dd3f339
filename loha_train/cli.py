"""Command line: `loha-train CONFIG.yaml` trains, `inspect` and `merge` handle LoHa files; the only place that exits."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence

USAGE = """\
usage: loha-train [train] CONFIG.yaml [options]         train (see loha-train CONFIG.yaml --help)
       loha-train inspect FILE [--base MODEL] [--json]   show a LoHa file; with --base, check it loads
       loha-train merge --base MODEL --adapter FILE --out PATH [--multiplier M] [--precision P] [--overwrite]

       loha-train --version

MODEL is a diffusers folder, a single-file .safetensors/.ckpt, or builtin:tiny-sd.
Exit status: 0 success, 1 a check failed (inspect --base) or the disk is full, 2 a usage or input error,
128+N training stopped by signal N (2 Ctrl-C, 15 kill) after writing a checkpoint."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "bad input" (reported in one paragraph, exit 2), as opposed to bugs (traceback)."""
    from loha_train.config import ConfigError
    from loha_train.data import DataError
    from loha_train.fileformat.adapter_io import AdapterError
    from loha_train.fileformat.merge import MergeError
    from loha_train.loha.inject import InjectError
    from loha_train.models.builtin import BuiltinError
    from loha_train.models.bundle import ModelError
    from loha_train.models.layout import ConversionError
    from loha_train.training.checkpoint import CheckpointError
    from loha_train.training.guards import TrainingError
    from loha_train.training.optim import OptimizerUnavailable

    return (
        AdapterError,
        BuiltinError,
        CheckpointError,
        ConfigError,
        ConversionError,
        DataError,
        InjectError,
        MergeError,
        ModelError,
        OptimizerUnavailable,
        TrainingError,
    )


@contextlib.contextmanager
def _stdout_reserved() -> Iterator[None]:
    """Keep stdout for machine-readable output: prints and lycoris-lora's stdout logger go elsewhere meanwhile."""
    lycoris = logging.getLogger("LyCORIS")  # lycoris-lora logs INFO lines with colour codes to stdout
    level = lycoris.level
    lycoris.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        lycoris.setLevel(level)


def _cmd_inspect(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loha-train inspect",
        description="Show a LoHa .safetensors: modules, ranks, alphas, shapes, metadata, target family. With "
        "--base, resolve every key as AUTOMATIC1111 WebUI and ComfyUI do on that model; any unmatched key fails.",
    )
    parser.add_argument("file", help="the LoHa .safetensors file")
    parser.add_argument("--base", metavar="MODEL", help="diffusers folder, single file, or builtin:tiny-sd")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    args = parser.parse_args(argv)
    from loha_train.fileformat.inspection import format_report, inspect_adapter, report_dict

    if args.json:
        with _stdout_reserved():
            report = inspect_adapter(args.file, args.base)
        print(json.dumps(report_dict(report), indent=2, ensure_ascii=False))
    else:
        report = inspect_adapter(args.file, args.base)
        print(format_report(report))
    return 0 if report.ok else 1


def _cmd_merge(argv: Sequence[str]) -> int:
    from loha_train.fileformat.merge import PRECISIONS

    parser = argparse.ArgumentParser(
        prog="loha-train merge",
        description="Bake a LoHa file into its base model: W + multiplier * DeltaW for every module it names. "
        "Writes a diffusers folder, or a single-file .safetensors when the base is one or --out ends with it.",
    )
    parser.add_argument("--base", required=True, metavar="MODEL", help="diffusers folder, single file, or builtin:NAME")
    parser.add_argument("--adapter", required=True, metavar="FILE", help="the LoHa .safetensors file")
    parser.add_argument("--out", required=True, metavar="PATH", help="output folder, or a .safetensors file")
    parser.add_argument("--multiplier", type=float, default=1.0, help="strength, as <lora:name:M> (default 1.0)")
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default=None,
        help="saved dtype (default fp32; a single-file base keeps each tensor's own dtype)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    from loha_train.fileformat.merge import merge_adapter

    out = merge_adapter(
        args.base,
        args.adapter,
        args.out,
        multiplier=args.multiplier,
        precision=args.precision,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loha-train",
        description="Train a LoHa adapter as CONFIG.yaml describes (the README lists every key).",
    )
    parser.add_argument("config", help="the run's YAML config")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=2e-4 (repeatable; values are read as YAML)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", nargs="?", const="latest", metavar="latest|PATH",
        help="continue from the newest complete checkpoint in output.dir, or from a checkpoint folder",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check config, model, data and targets; print the plan")
    parser.add_argument("--overwrite", action="store_true", help="start a new run in an output.dir that holds one")
    return parser


def _cmd_train(argv: Sequence[str]) -> int:
    """`loha-train CONFIG.yaml [--set k=v ...] [--resume [latest|PATH]] [--dry-run] [--overwrite]`."""
    args = _train_parser().parse_args(argv)
    from loha_train.config import load_config

    cfg = load_config(args.config, args.overrides)  # every config problem, before anything heavy loads
    from loha_train.training.optim import check_optimizer
    from loha_train.training.recipe import train
    from loha_train.training.signals import Interrupted

    check_optimizer(cfg)  # a missing package or a wrong optimizer_args, before any model loads
    _keep_freed_memory()
    try:
        adapter = train(cfg, resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run)
    except Interrupted as stop:
        where = f"a checkpoint was written to {stop.path}" if stop.path else "no checkpoint was written"
        launcher = "accelerate launch [your options] -m loha_train" if _world_size() > 1 else "loha-train"
        if _rank() == 0:
            print(
                f"loha-train: stopped at step {stop.step} ({stop}); {where}. Resume with:\n"
                f"  {launcher} {' '.join(argv_for_resume(argv))} --resume latest",
                file=sys.stderr,
            )
        return 128 + stop.signum
    except Exception as e:
        from loha_train.training.checkpoint import disk_full

        if not disk_full(e):
            raise
        where = getattr(e, "filename", None) or f"a file ({e})"
        print(
            f"loha-train: error: no space left on the device while writing {where}. Files are "
            "written to a temporary name and renamed, so the previous checkpoint and adapter are intact; free "
            "some space and resume with --resume latest.",
            file=sys.stderr,
        )
        return 1
    if adapter is not None and _rank() == 0:
        print(f"wrote {adapter}")
    return 0


def _rank() -> int:
    """This process's global rank under `accelerate launch`/torchrun; 0 for a plain run."""
    return int(os.environ.get("RANK") or 0)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the kernel after every step.

    Each training step frees and reallocates the same activations; by default glibc hands large blocks back to
    the kernel and page-faults them in again, which measured 25-30% of an SD1.5 CPU step. Peak memory is the
    same. Best effort: a no-op where libc has no mallopt (musl, macOS, Windows).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed threshold
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_top_pad, 2**28)


def argv_for_resume(argv: Sequence[str]) -> list[str]:
    """The user's arguments without --resume/--overwrite/--dry-run, to print the resume command."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--overwrite", "--dry-run") or arg.startswith("--resume="):
            continue
        if arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(shlex.quote(arg))
    return out


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": _cmd_train,  # `loha-train train CONFIG.yaml`, as other trainers spell it; the same as without it
    "inspect": _cmd_inspect,
    "merge": _cmd_merge,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status. User errors print one message to stderr (status 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        from loha_train import __version__

        print(f"loha-train {__version__}")
        return 0
    # under a multi-process launch the other ranks would repeat rank 0's warnings; they still report errors
    level = logging.WARNING if _rank() == 0 else logging.ERROR
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s: %(message)s")
    if _rank() == 0:
        logging.getLogger("loha_train.models.builtin").setLevel(logging.INFO)  # say that first use builds assets
    command = SUBCOMMANDS.get(args[0])
    try:
        if command is None:
            return _cmd_train(args)  # not a subcommand: a training run, `loha-train CONFIG.yaml [...]`
        return command(args[1:])
    except KeyboardInterrupt:
        print("loha-train: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        name = args[0] if command is not None else "train"
        print(f"loha-train {name}: error: {e}", file=sys.stderr)
        return 2
