"""Caption wildcards `{a|b|c}` (kohya's enable_wildcard): one option per group per step, drawn from the sample's
seeded caption RNG, resolved after caption dropout and before the tags are split for keep_tokens/shuffle/dropout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from loha_train.config import DataConfig
from loha_train.data import DataError, caption_rng, captions_vary, fixed_captions, process_caption
from loha_train.data.captions import resolve_wildcards
from loha_train.data.scan import ImageItem


def cfg(**overrides) -> DataConfig:
    return DataConfig(path="unused", caption_wildcards=True, **overrides)


def draws(caption: str, config: DataConfig, n: int = 400) -> Counter[str]:
    return Counter(process_caption(caption, config, caption_rng(7, 0, slot)) for slot in range(n))


def test_each_group_takes_one_of_its_options_uniformly() -> None:
    seen = draws("a {red|green|blue} {circle|square}", cfg())
    assert set(seen) == {f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")}
    assert min(seen.values()) > 400 / 6 * 0.5  # uniform: each of the 6 near 67 of 400


def test_kohya_escapes_and_group_bounds() -> None:
    rng = caption_rng(0, 0, 0)
    assert resolve_wildcards("{{literal}} and {a}", rng) == "{literal} and a"  # {{ }} are braces; one option: itself
    assert resolve_wildcards("no groups here", rng) == "no groups here"
    # a group runs to the first "}" (kohya's regex [^}]+): "{x|{y}" has the options "x" and "{y"
    assert set(draws("{x|{y}", cfg())) == {"x", "{y"}
    assert set(draws("{|b}", cfg())) == {"", "b"}  # an empty option is an option


def test_same_slot_same_caption_and_off_means_untouched() -> None:
    caption = "{red|green|blue|yellow} {circle|square|triangle}"
    first = [process_caption(caption, cfg(), caption_rng(1, 2, s)) for s in range(20)]
    again = [process_caption(caption, cfg(), caption_rng(1, 2, s)) for s in range(20)]
    assert first == again and len(set(first)) > 3
    assert process_caption(caption, DataConfig(path="unused"), caption_rng(1, 2, 0)) == caption


def test_wildcards_resolve_before_keep_tokens_and_shuffle() -> None:
    """kohya resolves wildcards first, so an option holding the separator becomes several tags, and keep_tokens
    counts the tags of the resolved caption."""
    config = cfg(shuffle_captions=True, keep_tokens=1)
    seen = draws("{sks person|sks dog}, {a, b|a, b}, c", config)
    for caption in seen:
        tags = caption.split(", ")
        assert tags[0] in ("sks person", "sks dog") and sorted(tags[1:]) == ["a", "b", "c"]
    assert len({c.split(", ", 1)[1] for c in seen}) == 6  # the three flexible tags in every order


def test_caption_dropout_comes_first() -> None:
    """A dropped caption is "" with no wildcard draw, so the next sample's draws do not depend on it."""
    config = cfg(caption_dropout=0.5)
    seen = draws("{a|b}", config)
    assert set(seen) == {"", "a", "b"} and 120 < seen[""] < 280
    for slot in range(50):  # the draws in kohya's order: the dropout coin, then (if kept) the group's option
        reference = caption_rng(7, 0, slot)
        want = "" if reference.random() < 0.5 else ("a", "b")[int(reference.integers(2))]
        assert process_caption("{a|b}", config, caption_rng(7, 0, slot)) == want


def test_wildcard_captions_are_not_text_cached() -> None:
    assert captions_vary(cfg()) and not captions_vary(DataConfig(path="unused"))
    with pytest.raises(DataError, match="fixed captions"):
        fixed_captions([ImageItem(key="x", path=Path("x.png"), caption="{a|b}", subset="x")], cfg())
