"""A real-format CLIP tokenizer with a tiny vocabulary, learned offline from a word list.

This is hand-written because no offline CLIP vocabulary ships with the libraries we use: transformers and
diffusers fetch `openai/clip-vit-large-patch14` (or `hf-internal-testing/tiny-random-clip` in their tests)
from the hub, and this machine, like CI, must never download at run time.

The folder we write has the same four files as `stable-diffusion-v1-5/tokenizer` (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json) and the same id layout as OpenAI's vocabulary:

    ids 0..255      the 256 byte characters of `bytes_to_unicode` (a byte inside a word)
    ids 256..511    the same characters + "</w>" (a byte that ends a word)
    ids 512..       one token per learned merge, in merge order
    last two ids    <|startoftext|>, <|endoftext|>   (so "eot has the highest id" holds, as CLIP assumes)

Because every byte has a token, any text still tokenizes: unknown words fall back to smaller pieces.

Note on transformers 5: `CLIPTokenizerFast` is only an alias of `CLIPTokenizer`, which is backed by the Rust
`tokenizers` library; the pure-Python "slow" CLIP tokenizer no longer exists. Our tests therefore compare the
loaded tokenizer against a plain Python reference of CLIP's original BPE.
"""

from __future__ import annotations

import heapq
import json
import unicodedata
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import regex
import transformers

from lorafuse.errors import UserInputError
from lorafuse.utils.atomic import atomic_write_bytes

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenizer (same pattern as OpenAI's `simple_tokenizer.py` and transformers' CLIPTokenizer): a word
# is a run of letters, a single digit, or a run of other non-space characters. BPE never crosses these borders,
# so a corpus word must be exactly one such piece to be able to become one token.
CLIP_PRETOKEN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

Pair = tuple[str, str]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (so merges.txt never holds spaces)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def word_symbols(word: str) -> tuple[str, ...]:
    """The BPE start state of one pre-token: its UTF-8 bytes as characters, the last one marked "</w>"."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return tuple(chars)


def bpe(symbols: tuple[str, ...], ranks: dict[Pair, int]) -> tuple[str, ...]:
    """CLIP's encoding rule: merge the lowest-ranked adjacent pair (all its occurrences, left to right), repeat."""
    word = list(symbols)
    while len(word) > 1:
        best = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return tuple(word)


def _check_words(words: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for word in words:
        # CLIP lowercases all text, so an upper-case corpus word could never be matched; say so instead of guessing.
        if word != word.lower() or unicodedata.normalize("NFC", word) != word:
            fixed = unicodedata.normalize("NFC", word.lower())
            raise UserInputError(
                f"tokenizer word {word!r} is not lower-case NFC text, which CLIP's normaliser makes of every "
                f"prompt, so it could never be matched; use {fixed!r}"
            )
        if CLIP_PRETOKEN.findall(word) != [word] or word in (BOS, EOS):
            raise UserInputError(
                f"tokenizer word {word!r} is not one CLIP pre-token (letters only, one digit, or one run of "
                "punctuation), so it can never be a single token; split it into such pieces"
            )
        counts[word] += 1
    if not counts:
        raise UserInputError("build_clip_tokenizer needs at least one word")
    return counts


def learn_merges(words: Iterable[str]) -> list[Pair]:
    """Learn BPE merges until every word is one token: merge the most frequent adjacent pair, repeat.

    Each word is segmented with `bpe` under the merges learned so far, so training and encoding can never
    disagree: a pair that the encoder would merge never survives in a segmentation, hence every chosen pair is
    new and the result encodes every corpus word as a single token. Ties go to the smallest pair (string order),
    and counts are over the multiset of words, so the merges do not depend on the order of `words`.
    """
    counts = _check_words(words)
    ranks: dict[Pair, int] = {}
    segs = {w: word_symbols(w) for w in counts}
    pair_count: Counter[Pair] = Counter()
    holders: dict[Pair, set[str]] = {}  # pair -> words whose segmentation contains it
    heap: list[tuple[int, Pair]] = []  # (-count, pair); stale entries are skipped on pop

    def account(word: str, sign: int) -> None:
        seg = segs[word]
        for pair in zip(seg, seg[1:], strict=False):
            pair_count[pair] += sign * counts[word]
            if sign > 0:
                holders.setdefault(pair, set()).add(word)
            else:
                holders[pair].discard(word)
            heapq.heappush(heap, (-pair_count[pair], pair))

    for word in sorted(segs):
        account(word, +1)
    while heap:
        neg, pair = heapq.heappop(heap)
        if pair_count[pair] <= 0 or -neg != pair_count[pair]:
            continue  # stale heap entry
        ranks[pair] = len(ranks)
        # Continuing from the current segmentation equals re-encoding from bytes, because `pair` has the
        # highest rank and so is only reached once every older merge is done.
        for word in sorted(holders[pair]):
            account(word, -1)
            segs[word] = bpe(segs[word], ranks)
            account(word, +1)
    return list(ranks)


def build_vocab(merges: list[Pair]) -> dict[str, int]:
    """OpenAI's layout: bytes, bytes + "</w>", merged tokens in merge order, then the two special tokens."""
    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        # Two merges can spell the same string ("ab"+"c", "a"+"bc"); one id serves both, as in a dict-built vocab.
        vocab.setdefault(token, len(vocab))
    return vocab


def _added_token(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def build_clip_tokenizer(
    words: Iterable[str],
    out_dir: Path,
    *,
    model_max_length: int = 77,
    pad_token: str = EOS,
) -> transformers.CLIPTokenizer:
    """Write a CLIP tokenizer folder in which every word of `words` is one token, and load it from there.

    `pad_token` is "<|endoftext|>" as in SD1.5 and SDXL's first tokenizer; SDXL's second (OpenCLIP bigG) pads
    with "!" instead. Same words in -> byte-identical files out.
    """
    out_dir = Path(out_dir)
    merges = learn_merges(words)
    vocab = build_vocab(merges)
    if pad_token not in vocab:
        raise UserInputError(
            f"pad_token {pad_token!r} is not in the tokenizer vocabulary; use {EOS!r} or '!'"
        )

    special_map = {
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "unk_token": _added_token(EOS),
        "pad_token": pad_token,
    }
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_added_token(BOS)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_added_token(EOS)},
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token(EOS)},
    }
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special_map, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True),
    }
    for name, text in files.items():
        # Explicit UTF-8: byte characters like "Ġ" must not depend on the locale.
        atomic_write_bytes(out_dir / name, text.encode("utf-8"))
    return transformers.CLIPTokenizer.from_pretrained(out_dir)


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's real SentencePiece vocabulary
SPIECE_UNDERLINE = "▁"  # SentencePiece's word-start marker


def build_t5_tokenizer(words: Iterable[str], *, model_max_length: int = 512, extra_ids: int = 0) -> transformers.T5Tokenizer:
    """A T5 (Unigram) tokenizer in which every word of `words` is one token, built in memory.

    transformers' own `T5Tokenizer` builds T5's normaliser, Metaspace pre-tokeniser and "</s>" post-processor
    from a (piece, score) list, so only the vocabulary is ours: the specials at T5's ids, the word-start
    marker, each word with its marker, and every single character so any text still tokenizes (as T5's byte
    pieces do). Word pieces score higher than characters, so a known word is always one token.
    """
    words = sorted(set(_check_words(words)))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [(SPIECE_UNDERLINE, -2.0)]
    vocab += [(SPIECE_UNDERLINE + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in chars]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=model_max_length)
