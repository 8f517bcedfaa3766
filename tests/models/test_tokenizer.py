"""The hand-built CLIP tokenizer: real file format, one token per corpus word, same ids as CLIP's own BPE."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import regex
from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from lorafuse.errors import UserInputError
from lorafuse.models.tokenizer import BOS, EOS, build_clip_tokenizer, bytes_to_unicode

WORDS = ["a", "photo", "of", "the", "dog", "dogs", "watercolor", "painting", "style", "café", "in", "on", ","]
SENTENCES = [
    "a photo of sks dog",  # "sks" is not in the corpus: byte-piece fallback
    "A  Photo\tof the DOG, in watercolor painting style",  # case and whitespace are normalised by CLIP
    "dogs in 1984 on the moon!!",  # digits split one by one
    "café naïve Ünïcode ☃ 🐕",  # multi-byte characters
    "<|startoftext|> a dog <|endoftext|>",
    "",
]


def reference_ids(text: str, folder: Path) -> list[int]:
    """OpenAI's `simple_tokenizer.py` algorithm written out plainly, reading only the files on disk."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    byte_char = bytes_to_unicode()
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    ids = [vocab[BOS]]
    for piece in pattern.findall(text):
        if piece in (BOS, EOS):
            ids.append(vocab[piece])
            continue
        word = [byte_char[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            i, merged = 0, []
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[t] for t in word)
    return [*ids, vocab[EOS]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer(WORDS, out)
    return out


def test_writes_the_real_clip_files(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    # OpenAI's id layout: bytes first ("!" is 0), word-final bytes next, special tokens last.
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    assert sorted(vocab.values()) == list(range(len(vocab)))


@pytest.mark.parametrize("cls", [CLIPTokenizer, CLIPTokenizerFast], ids=["slow", "fast"])
def test_every_corpus_word_is_one_token(folder: Path, cls: type) -> None:
    tok = cls.from_pretrained(folder)
    vocab, byte_char = tok.get_vocab(), bytes_to_unicode()
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        # Vocabulary entries spell the UTF-8 bytes: "café" is stored as "cafÃ©</w>".
        assert ids == [vocab["".join(byte_char[b] for b in word.encode("utf-8")) + "</w>"]], word


def test_slow_fast_and_reference_agree(folder: Path) -> None:
    # In transformers 5 CLIPTokenizerFast is an alias of the Rust-backed CLIPTokenizer, so the meaningful
    # "slow" side is the plain Python reference above.
    slow, fast = CLIPTokenizer.from_pretrained(folder), CLIPTokenizerFast.from_pretrained(folder)
    auto = AutoTokenizer.from_pretrained(folder)
    for text in SENTENCES:
        expected = reference_ids(text, folder)
        assert slow(text).input_ids == expected, text
        assert fast(text).input_ids == expected, text
        assert auto(text).input_ids == expected, text


def test_unknown_words_fall_back_to_pieces(folder: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(folder)
    pieces = tok.tokenize("sks")
    assert len(pieces) > 1 and "".join(pieces) == "sks</w>"
    assert tok.unk_token_id not in tok("sks zebra ☃").input_ids[1:-1]
    assert tok.decode(tok("a photo of sks dog").input_ids, skip_special_tokens=True) == "a photo of sks dog"


def test_pads_and_truncates_to_77(folder: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.model_max_length == 77 and tok.pad_token == EOS
    ids = tok("a dog", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:4] == [tok.bos_token_id, *tok("a dog", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert set(ids[4:]) == {tok.pad_token_id}
    long = tok(" ".join(["dog"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == tok.bos_token_id and long[-1] == tok.eos_token_id


def test_deterministic_and_order_free(tmp_path: Path) -> None:
    build_clip_tokenizer(WORDS, tmp_path / "one")
    build_clip_tokenizer(list(reversed(WORDS)), tmp_path / "two")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_sdxl_second_tokenizer_pads_with_bang(tmp_path: Path) -> None:
    tok = build_clip_tokenizer(["dog"], tmp_path, pad_token="!")
    ids = tok("dog", padding="max_length", max_length=77).input_ids
    assert tok.pad_token_id == 0 and ids[3:] == [0] * 74


@pytest.mark.parametrize("bad", ["Dog", "v2", "two words", "dog!", ""])
def test_rejects_words_that_cannot_be_one_token(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UserInputError, match="tokenizer word"):
        build_clip_tokenizer(["dog", bad], tmp_path)


def test_rejects_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="at least one word"):
        build_clip_tokenizer([], tmp_path)
