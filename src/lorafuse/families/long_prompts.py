"""Prompts longer than CLIP's 75 tokens, as kohya sd-scripts encodes them (`max_token_length` 150 or 225).

The caption is tokenized to max_token_length + 2 ids (BOS, the tokens, EOS, padding) and cut into n =
max_token_length / 75 windows of 75 tokens; each window becomes its own 77-id CLIP input
`BOS + window + last id`, the text encoder runs on the n inputs, and the hidden states are joined back as
`BOS state + the 75 inner states of each window + the last window's final state`, i.e. (B, 2 + 75 n, D).

Tokenizers whose pad token is not EOS (SDXL's second, OpenCLIP bigG) get kohya's two fix-ups per window: a
window that ends inside the text ends with EOS, and an empty window (BOS, PAD, ...) starts BOS, EOS. SDXL's pooled
embedding is the first window's. A1111 and kohya's sampler (lpw) join per-window outputs the same way, so the
same function serves sampling.
"""

from __future__ import annotations

import torch

WINDOW = 75  # tokens per CLIP input without BOS and EOS


def num_windows(max_token_length: int | None) -> int:
    return 1 if max_token_length is None else max_token_length // WINDOW


def chunked_input_ids(tokenizer, captions: list[str], max_token_length: int) -> torch.Tensor:
    """(B, n, 77) CLIP input ids: the caption in n windows of 75 tokens, each wrapped in BOS ... last-id."""
    size = tokenizer.model_max_length  # 77
    ids = tokenizer(
        captions, padding="max_length", truncation=True, max_length=max_token_length + 2, return_tensors="pt"
    ).input_ids  # (B, max_token_length + 2)
    bos, last = ids[:, :1], ids[:, -1:]
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    windows = []
    for start in range(1, max_token_length + 1, size - 2):
        chunk = torch.cat([bos, ids[:, start : start + size - 2], last], dim=1).clone()  # (B, 77)
        if not pad_is_eos:
            specials = (tokenizer.eos_token_id, tokenizer.pad_token_id)
            inside = ~torch.isin(chunk[:, -2], torch.tensor(specials))
            chunk[inside, -1] = tokenizer.eos_token_id  # the text runs past this window: close it with EOS
            empty = chunk[:, 1] == tokenizer.pad_token_id
            chunk[empty, 1] = tokenizer.eos_token_id  # an empty window still reads BOS, EOS
        windows.append(chunk)
    return torch.stack(windows, dim=1)


def merge_windows(hidden: torch.Tensor, batch: int, size: int = 77) -> torch.Tensor:
    """(B * n, 77, D) per-window states -> (B, 2 + 75 n, D): BOS, each window's inner 75, the last state."""
    hidden = hidden.reshape(batch, -1, hidden.shape[-1])  # (B, n * 77, D)
    n = hidden.shape[1] // size
    parts = [hidden[:, :1]]
    for k in range(n):
        parts.append(hidden[:, k * size + 1 : k * size + size - 1])
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)
