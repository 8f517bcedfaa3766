"""Prompts encoded for sampling as kohya's sampler (its long-prompt-weighting pipeline) and A1111 encode them:

- up to 3 CLIP windows of 75 tokens (225), as many as the longer of prompt and negative prompt needs; each window
  is its own 77-id input BOS + 75 tokens + the last id, and every window keeps all 77 output states, so n windows
  give (1, 77 n, D) (training joins windows as 2 + 75 n instead: families/long_prompts.py);
- the ids end with EOS, then padding; a tokenizer whose pad is not EOS (SDXL's second) gets kohya's two
  per-window fix-ups;
- attention weights `(word)` x1.1, `[word]` /1.1, `(word:1.3)` x1.3, nested multiplicatively, `\\(` for a literal
  bracket; each token's states are scaled by its weight, then the whole embedding by old mean / new mean;
- A1111's `BREAK` (the capital word on its own) ends the current window: the rest of it is padding.
SDXL: both encoders' penultimate states concatenated, the pooled embedding of text_encoder_2's first window.
"""

from __future__ import annotations

import re

import torch

WINDOW = 75
MAX_WINDOWS = 3  # kohya's sampler: max_embeddings_multiples = 3
_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\)|\[|\]|:\s*([+-]?[\d.]+)\s*\)|[^\\()\[\]:]+|:|\\")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """'a (red:1.5) [dog]' -> [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('dog', 1/1.1)]; BREAK kept as ('BREAK', -1)."""
    pieces: list[list] = []
    opened: list[tuple[str, int]] = []  # bracket kind and the index of its first piece

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            pieces.append([tok[1], 1.0])
        elif tok in ("(", "["):
            opened.append((tok, len(pieces)))
        elif weight is not None and opened and opened[-1][0] == "(":
            scale(opened.pop()[1], float(weight))
        elif tok == ")" and opened and opened[-1][0] == "(":
            scale(opened.pop()[1], 1.1)
        elif tok == "]" and opened and opened[-1][0] == "[":
            scale(opened.pop()[1], 1 / 1.1)
        else:
            pieces.append([tok, 1.0])
    for kind, start in opened:  # unclosed brackets still weigh what follows them
        scale(start, 1.1 if kind == "(" else 1 / 1.1)
    merged: list[list] = []
    for piece in pieces:  # neighbours of equal weight are one text (tokenized together, as kohya)
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    out: list[tuple[str, float]] = []
    for piece, w in merged:
        parts = _BREAK.split(piece)
        for i, part in enumerate(parts):
            if i:
                out.append(("BREAK", -1.0))
            if part:
                out.append((part, w))
    return out


def prompt_tokens(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids (no BOS / EOS, at most 225) and their weights; a BREAK fills the current window to its end with
    EOS then padding, as A1111 closes a window."""
    ids: list[int] = []
    weights: list[float] = []
    for text, w in parse_weights(prompt):
        if w < 0:  # BREAK
            fill = -len(ids) % WINDOW
            ids += ([tokenizer.eos_token_id] + [tokenizer.pad_token_id] * WINDOW)[:fill]
            weights += [1.0] * fill
            continue
        toks = tokenizer(text, add_special_tokens=False).input_ids
        ids += toks
        weights += [w] * len(toks)
    return ids[: WINDOW * MAX_WINDOWS], weights[: WINDOW * MAX_WINDOWS]


def _windows(tokenizer, ids: list[int], n: int) -> torch.Tensor:
    """(n, 77) inputs as kohya's sampler cuts them: BOS + ids + EOS + padding, window k the 77 ids from 75 k with
    BOS first and, last, the sequence's final id (a pad-is-EOS tokenizer) or EOS where the text runs on."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    full = [bos, *ids, eos] + [pad] * (WINDOW * n - len(ids))
    rows = []
    for k in range(n):
        row = full[k * WINDOW : k * WINDOW + WINDOW + 2]
        row[0] = bos
        if pad == eos:
            row[-1] = full[-1]
        else:
            if row[-1] not in (eos, pad):
                row[-1] = eos
            if row[1] == pad:
                row[1] = eos
        rows.append(row)
    return torch.tensor(rows)


def _states(encoder, ids: torch.Tensor, clip_skip: int, two_encoders: bool):
    res = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
    if two_encoders:
        return res.hidden_states[-2], getattr(res, "text_embeds", None)
    if clip_skip == 1:
        return res.last_hidden_state, None
    norm = encoder.final_layer_norm if hasattr(encoder, "final_layer_norm") else encoder.text_model.final_layer_norm
    return norm(res.hidden_states[-clip_skip]), None


def sample_embeddings(tokenizers, encoders, prompts: list[str], clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """{"encoder_hidden_states": (P, 77 n, D)[, "pooled_prompt_embeds": (P, D2)]} for the prompts (e.g. prompt and
    negative prompt), n shared by all of them. clip_skip in kohya's numbering (SD1.5 only)."""
    per_tok = [[prompt_tokens(tok, p) for p in prompts] for tok in tokenizers]
    longest = max(len(ids) for tok in per_tok for ids, _ in tok)
    n = min(MAX_WINDOWS, max(1, -(-longest // WINDOW)))
    hidden, out = [], {}
    for tok, enc, parsed in zip(tokenizers, encoders, per_tok, strict=True):
        rows, pooled = [], []
        for ids, weights in parsed:
            states, pool = _states(enc, _windows(tok, ids, n), clip_skip, len(encoders) == 2)  # (n, 77, D)
            states = states.reshape(1, -1, states.shape[-1]).float()  # (1, 77 n, D): every window whole
            w = torch.ones(n, 77)
            w[:, 1:-1] = torch.tensor((weights[: WINDOW * n] + [1.0] * WINDOW * n)[: WINDOW * n]).view(n, WINDOW)
            before = states.mean()
            states = states * w.reshape(1, -1, 1)
            rows.append(states * (before / states.mean()))
            if pool is not None:
                pooled.append(pool[:1].float())
        hidden.append(torch.cat(rows))
        if pooled:
            out["pooled_prompt_embeds"] = torch.cat(pooled)
    out["encoder_hidden_states"] = torch.cat(hidden, dim=-1)
    return out
