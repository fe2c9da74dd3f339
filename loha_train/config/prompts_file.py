"""`sample.prompts_file`: kohya's sample prompt file (one prompt a line with --n --w --h --s --l --d) as SamplePrompts.

kohya (`library/train_util.py`, `line_to_prompt_dict` and `sample_images`): lines that are empty after stripping or
whose first character is `#` are skipped; a line is split on " --"; the first part is the prompt and each other
part an option: `n` negative prompt, `w`/`h` size (rounded down to a multiple of 8, at least 64, as kohya's
sampler does), `s` steps (clamped to 1..1000), `l` guidance scale, `d` seed. Options kohya knows but loha-train has
no equivalent for (`ss` sampler, `cn` ControlNet image, ...) are ignored, as kohya ignores unknown ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

_OPTIONS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    (r"w (\d+)", "width", lambda v: max(64, int(v) - int(v) % 8)),
    (r"h (\d+)", "height", lambda v: max(64, int(v) - int(v) % 8)),
    (r"d (\d+)", "seed", int),
    (r"s (\d+)", "steps", lambda v: max(1, min(1000, int(v)))),
    (r"l ([\d\.]+)", "guidance", float),
    (r"n (.+)", "negative_prompt", str),
)


def parse_prompt_line(line: str) -> dict[str, Any]:
    """One prompt line as SamplePrompt fields (prompt, and whichever options the line gives); ValueError when an
    option's value does not parse (`--l 7.5.1`)."""
    prompt, *options = line.split(" --")
    fields: dict[str, Any] = {"prompt": prompt}
    for option in options:
        for pattern, name, convert in _OPTIONS:
            match = re.match(pattern, option, re.IGNORECASE)
            if match:
                try:
                    fields[name] = convert(match.group(1))
                except ValueError:
                    raise ValueError(f"--{option.strip()}: {match.group(1)!r} is not a number") from None
                break
    return fields


def read_prompts_file(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, SamplePrompt fields) for each prompt line of a kohya prompt file; ValueError naming the line."""
    text = Path(path).read_text(encoding="utf-8-sig")
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line[0] == "#":
            continue
        try:
            out.append((number, parse_prompt_line(line.strip())))
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
    return out
