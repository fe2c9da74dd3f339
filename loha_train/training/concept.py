"""sample.concept: score samples for a concept ("purple star"), log it with each sampling, report it at the end.

The measure is models/demo.py's (target-colour pixel fraction, shape score of the largest blob of that colour),
taken over the images of the prompts that name both of the concept's words. At the end of a run the prompts are
sampled once more with the adapter at multiplier 0, which must reproduce the base model's images (the step-0
samples, when the adapter started from zero): samples/concept.json holds the numbers, samples/concept.png shows
the three rows (before, after, multiplier 0) labelled with their prompts and steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from loha_train.config import Config
from loha_train.models.demo import ConceptScore, concept_measure
from loha_train.training.metrics import save_png

REPORT_JSON = "concept.json"
REPORT_PNG = "concept.png"


def concept_indices(cfg: Config) -> list[int]:
    """Indices of the sample prompts that name both words of sample.concept."""
    words = (cfg.sample.concept or "").split()
    return [i for i, p in enumerate(cfg.sample.prompts) if words and all(w in p.prompt.split() for w in words)]


def score(cfg: Config, images: Sequence[Image.Image]) -> ConceptScore | None:
    """The concept measure of the images of the concept's prompts; None without sample.concept."""
    if cfg.sample.concept is None:
        return None
    colour, shape = cfg.sample.concept.split()
    return concept_measure([images[i] for i in concept_indices(cfg)], colour, shape)


def scalars(result: ConceptScore) -> dict[str, float]:
    """What goes into metrics.jsonl and TensorBoard with each sampling."""
    return {"concept_colour": result.colour, "concept_shape": result.shape}


def _load(folder: Path, step: int, count: int) -> list[Image.Image] | None:
    paths = [folder / f"step-{step:06d}-{i:02d}.png" for i in range(count)]
    if not all(p.is_file() for p in paths):
        return None
    images = []
    for p in paths:
        with Image.open(p) as image:
            images.append(image.convert("RGB"))
    return images


def report(cfg: Config, folder: Path, step: int, at_zero: Sequence[Image.Image], from_zero: bool) -> dict[str, Any]:
    """Write samples/concept.json, samples/multiplier-0-PP.png and samples/concept.png; return the report.

    `at_zero`: the prompts' images with the adapter at multiplier 0; `from_zero`: the adapter started at zero
    (no network.init_from), so the step-0 samples are the base model's.
    """
    count = len(cfg.sample.prompts)
    for i, image in enumerate(at_zero):
        save_png(image, folder / f"multiplier-0-{i:02d}.png")
    before, after = _load(folder, 0, count), _load(folder, step, count)
    rows: dict[str, Any] = {}
    for label, images in (("before", before), ("after", after), ("multiplier_0", list(at_zero))):
        result = score(cfg, images) if images is not None else None
        rows[label] = None if result is None else {"colour": round(result.colour, 4), "shape": round(result.shape, 4)}
    same = None
    if before is not None and from_zero:
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, at_zero, strict=True))
    out: dict[str, Any] = {
        "concept": cfg.sample.concept,
        "prompts": [cfg.sample.prompts[i].prompt for i in concept_indices(cfg)],
        "step": step,
        **rows,
        "multiplier_0_equals_base": same,
    }
    (folder / REPORT_JSON).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    labelled = [("step 0 (base model)", before), (f"step {step}", after), (f"step {step}, multiplier 0", at_zero)]
    save_png(labelled_grid(cfg, [(t, list(i)) for t, i in labelled if i is not None]), folder / REPORT_PNG)
    return out


def describe(out: dict[str, Any]) -> str:
    """The lines the run prints at its end."""

    def cell(row: dict[str, float] | None) -> str:
        return "   n/a" if row is None else f"{row['colour']:6.3f}   {row['shape']:6.3f}"

    colour, shape = out["concept"].split()
    same = {True: "yes", False: "NO", None: "n/a"}[out["multiplier_0_equals_base"]]
    return "\n".join(
        [
            f"concept measure for {out['concept']!r} over {len(out['prompts'])} prompt(s) "
            f"({colour} pixel fraction, {shape} shape score 0-1):",
            f"  step 0 (base model)     {cell(out['before'])}",
            f"  step {out['step']:<6d}             {cell(out['after'])}",
            f"  multiplier 0            {cell(out['multiplier_0'])}   identical to the base model's images: {same}",
        ]
    )


def labelled_grid(cfg: Config, rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int = 128) -> Image.Image:
    """One row per (label, images), one column per prompt, each image scaled to `cell` px; prompts on top."""
    prompts = [p.prompt for p in cfg.sample.prompts]
    label_w, header_h, line_h = 150, 52, 12
    canvas = Image.new("RGB", (label_w + cell * len(prompts), header_h + (cell + 4) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        for k, line in enumerate(_wrap(prompt, cell // 6)):
            draw.text((label_w + j * cell + 4, 4 + k * line_h), line, fill="black")
    for r, (label, images) in enumerate(rows):
        y = header_h + r * (cell + 4)
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for j, image in enumerate(images):
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (label_w + j * cell, y))
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines
