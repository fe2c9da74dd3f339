"""A CLIP-style byte-level BPE tokenizer learned from a small corpus, saved as the SD repos' tokenizer folders."""

# CLIP's scheme: NFC, whitespace runs -> one space, lowercase, CLIP's word regex, bytes mapped to printable
# characters (GPT-2's table), `</w>` appended to each word's last symbol, `<|startoftext|>`/`<|endoftext|>`.
# The learner is a few lines of greedy BPE (ties broken lexicographically), so its output depends on nothing but
# the corpus: no library version can change the vocabulary. The vocabulary keeps CLIP's layout (256 byte
# symbols, the same with `</w>`, the merges, then the two specials), so `CLIPTokenizer.from_pretrained` reads
# the folder exactly as it reads openai/clip-vit-large-patch14's.

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern for ASCII text (letters, single digits, punctuation runs); corpora must be ASCII.
_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the ByteLevel pre-tokenizer uses it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_CHARS = _bytes_to_unicode()


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_clip_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-layout byte-level BPE: returns (token -> id, merges in rank order).

    Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: the lexicographically smallest), until
    the vocabulary (512 byte symbols + merges + 2 specials) reaches `vocab_size` or every word is one token.
    """
    byte_chars = list(_BYTE_CHARS.values())
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        if not text.isascii():
            raise ValueError(f"the BPE corpus must be ASCII, got {text!r}")
        for w in _WORD_RE.findall(" ".join(text.lower().split())):
            symbols = [_BYTE_CHARS[b] for b in w.encode("utf-8")]
            words[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    while 2 * len(byte_chars) + len(merges) + 2 < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge_word(w, best): c for w, c in words.items()})
    # Two merges can spell the same token ("ab"+"c", "a"+"bc"): it gets one id, the ids stay contiguous.
    tokens = dict.fromkeys([*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), BOS, EOS])
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(
    dest: Path, vocab: dict[str, int], merges: list[tuple[str, str]], *, pad_token: str = EOS
) -> None:
    """Write a tokenizer folder laid out like the SD repos' (vocab.json, merges.txt, configs)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (dest / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (dest / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
