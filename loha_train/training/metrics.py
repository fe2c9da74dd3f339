"""Run logs: TensorBoard scalars and images, a metrics.jsonl that resumes cleanly, and a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Writes logs/ on the main process: TensorBoard events and one JSON line per logged step.

    On resume, lines after the checkpoint's step are dropped and TensorBoard purges its later events,
    so step numbers continue rather than restart or duplicate. `sink` (e.g. a WandbSink) gets the same scalars
    and images through its own `scalars(step, values)`, `image(tag, image, step)` and `close()`.
    """

    def __init__(self, log_dir: Path, start_step: int = 0, enabled: bool = True, sink: Any = None) -> None:
        self.enabled = enabled
        self.path = log_dir / METRICS_FILE
        self._writer: Any = None
        self._sink = sink if enabled else None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        if self._sink is not None:
            self._sink.scalars(step, values)
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        except OSError as e:  # a full disk: say which file (a torn last line is dropped when the run resumes)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.enabled:
            self._writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self._sink is not None:
            self._sink.image(tag, image, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The logged rows; a line that does not parse (torn by a kill or a full disk while appending) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = None
            logger.warning("%s:%d: skipping a torn line (the run was killed while writing it)", path, number)
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _truncate_after(path: Path, step: int) -> None:
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def save_png(image: Image.Image, path: Path) -> None:
    """Write through a hidden temporary file and rename: a full disk or a kill never leaves a torn PNG at `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
