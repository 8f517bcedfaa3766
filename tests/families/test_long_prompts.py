"""kohya's max_token_length: 75-token windows with BOS/EOS each, checked against a reference built by hand."""

from __future__ import annotations

import pytest
import torch

from lorafuse.families.long_prompts import chunked_input_ids
from lorafuse.models.tiny import TINY_WORDS, tiny_pipeline
from lorafuse.train.cache import text_embeddings


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return tiny_pipeline(request.param)


def _caption(n_tokens: int) -> str:
    words = [w for w in TINY_WORDS if w.isalpha()][:20]
    return " ".join(words[i % len(words)] for i in range(n_tokens))


def _reference_ids(tok, caption: str, max_token_length: int) -> list[list[int]]:
    """The chunk rule written out: BOS, tokens, EOS, pad to max_token_length + 2; windows of 75 after BOS, each
    BOS + window + the last id; with a non-EOS pad, a window ending in text gets EOS last, and an empty window
    gets EOS second."""
    body = tok(caption, add_special_tokens=False).input_ids[:max_token_length]
    full = [tok.bos_token_id, *body, tok.eos_token_id]
    full = (full + [tok.pad_token_id] * (max_token_length + 2))[: max_token_length + 2]
    if len(body) == max_token_length:
        full[-1] = tok.eos_token_id  # truncation keeps the EOS
    windows = []
    for k in range(max_token_length // 75):
        w = [full[0], *full[1 + 75 * k : 76 + 75 * k], full[-1]]
        if tok.pad_token_id != tok.eos_token_id:
            if w[-2] not in (tok.eos_token_id, tok.pad_token_id):
                w[-1] = tok.eos_token_id
            if w[1] == tok.pad_token_id:
                w[1] = tok.eos_token_id
        windows.append(w)
    return windows


@pytest.mark.parametrize("n_tokens", [10, 75, 100, 200, 300])
@pytest.mark.parametrize("max_token_length", [150, 225])
def test_input_ids_follow_the_chunk_rule(pipe, n_tokens, max_token_length):
    caption = _caption(n_tokens)
    for tok in [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]:
        if tok is None:
            continue
        assert len(tok(caption, add_special_tokens=False).input_ids) == n_tokens  # one token per word
        got = chunked_input_ids(tok, [caption, "short"], max_token_length)
        assert tuple(got.shape) == (2, max_token_length // 75, 77)
        assert got[0].tolist() == _reference_ids(tok, caption, max_token_length)
        assert got[1].tolist() == _reference_ids(tok, "short", max_token_length)


def _reference_states(pipe, caption: str, max_token_length: int, clip_skip: int = 1) -> torch.Tensor:
    """Encode each window alone and keep BOS, the 75 inner states of every window, then the last state."""
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "tokenizer_2", None) is not None:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    per_encoder = []
    for tok, te in encoders:
        states = []
        for window in _reference_ids(tok, caption, max_token_length):
            out = te(torch.tensor([window]), output_hidden_states=True)
            states.append(out.hidden_states[-2][0] if len(encoders) == 2 else out.last_hidden_state[0])
        joined = [states[0][:1]] + [s[1:76] for s in states] + [states[-1][76:]]
        per_encoder.append(torch.cat(joined))
    return torch.cat(per_encoder, dim=-1)


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_embeddings_join_the_windows(pipe, max_token_length):
    captions = [_caption(160), _caption(20)]
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if hasattr(pipe, "tokenizer_2") else [])
    with torch.no_grad():
        got = text_embeddings(tokenizers, encoders, captions, 1, max_token_length)
        states = got["encoder_hidden_states"]
        assert states.shape[1] == 2 + max_token_length
        for i, caption in enumerate(captions):
            torch.testing.assert_close(states[i], _reference_states(pipe, caption, max_token_length))
        if len(encoders) == 2:  # SDXL's pooled embedding is the first window's
            first = torch.tensor([_reference_ids(pipe.tokenizer_2, captions[0], max_token_length)[0]])
            pooled = pipe.text_encoder_2(first).text_embeds[0]
            torch.testing.assert_close(got["pooled_prompt_embeds"][0], pooled)
        # tokens past 75 reach the embedding: the long caption and its 75-token prefix differ
        cut = text_embeddings(tokenizers, encoders, [_caption(75)], 1, max_token_length)[
            "encoder_hidden_states"
        ]
        assert not torch.allclose(cut[0], states[0], atol=1e-4)


def test_without_max_token_length_nothing_changes(pipe):
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if hasattr(pipe, "tokenizer_2") else [])
    with torch.no_grad():
        plain = text_embeddings(tokenizers, encoders, [_caption(30)])["encoder_hidden_states"]
        same = text_embeddings(tokenizers, encoders, [_caption(30)], 1, 75)["encoder_hidden_states"]
    assert plain.shape[1] == 77
    torch.testing.assert_close(plain, same)
