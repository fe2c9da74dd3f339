"""Weights & Biases logging (`logging.wandb`): the scalars and sample grids TensorBoard gets, online or offline."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from loha_train.config import Config, config_to_dict
from loha_train.training.guards import TrainingError

RUN_ID_FILE = "run_id"  # in logs/wandb/: a resumed run continues the same W&B run


def check_wandb(cfg: Config) -> None:
    """Refuse logging.wandb without the wandb package, before anything loads."""
    if cfg.logging.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise TrainingError(
            "logging.wandb is set, but the wandb package is not installed. Install it with "
            '`pip install "loha-train[wandb]"` (or `pip install wandb`), or remove logging.wandb from the config.'
        )


class WandbSink:
    """A W&B run under <logs>/wandb: `scalars` and `image` as MetricsLog calls them; WANDB_MODE=offline keeps the
    run on disk (`wandb sync` uploads it later). A resumed run (start_step > 0) continues the run it started."""

    def __init__(self, cfg: Config, log_dir: Path, start_step: int) -> None:
        import wandb

        settings = cfg.logging.wandb
        assert settings is not None
        (log_dir / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = log_dir / "wandb" / RUN_ID_FILE
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n", encoding="utf-8")
        self._wandb = wandb
        self.run: Any = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.run_name or cfg.output.name,
            tags=list(settings.tags),
            dir=str(log_dir),
            id=run_id,
            resume="allow",
            config=config_to_dict(cfg),
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self.run.log({tag: self._wandb.Image(image.convert("RGB"))}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_sink(cfg: Config, log_dir: Path, start_step: int, main: bool) -> WandbSink | None:
    """The W&B sink of the main process when logging.wandb is set, else None."""
    return WandbSink(cfg, log_dir, start_step) if main and cfg.logging.wandb is not None else None
