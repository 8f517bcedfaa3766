"""CLIP prompt encoding shared by the families that use CLIP text encoders, with clip skip.

Clip skip is numbered differently in the two ecosystems:
- kohya sd-scripts / A1111 / ComfyUI count the layers *used from the end*: 1 = last layer (no skip),
  2 = penultimate. Values start at 1.
- diffusers counts the layers *skipped*: None or 0 = last layer, 1 = penultimate.
So kohya/A1111 `clip_skip=2` == diffusers `clip_skip=1`. Our API uses the diffusers numbering; pass
`clip_skip_convention="a1111"` to give the kohya/A1111 number instead.

For SD1.5 a skipped output still goes through the text encoder's final LayerNorm (as diffusers and A1111 do:
the last hidden state is normalised, so an earlier one must be too). SDXL already reads the penultimate layer of
both encoders without that LayerNorm, and clip skip counts from there (diffusers `hidden_states[-(k + 2)]`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse.errors import UserInputError

logger = logging.getLogger(__name__)

CLIP_SKIP_CONVENTIONS = ("diffusers", "a1111")


def resolve_clip_skip(clip_skip: int | None, convention: str = "diffusers") -> int:
    """The number of final text-encoder layers to skip (diffusers numbering, 0 = none)."""
    if convention not in CLIP_SKIP_CONVENTIONS:
        raise UserInputError(
            f"unknown clip_skip_convention {convention!r}; expected one of {', '.join(CLIP_SKIP_CONVENTIONS)}"
        )
    if clip_skip is None:
        return 0
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise UserInputError(f"clip_skip must be an int or None, got {type(clip_skip).__name__}")
    if convention == "a1111":
        if clip_skip < 1:
            raise UserInputError(
                f"clip_skip={clip_skip} with the a1111 convention: values start at 1 (1 = last layer, "
                "2 = penultimate); for the diffusers numbering (0 = last) use clip_skip_convention='diffusers'"
            )
        return clip_skip - 1
    if clip_skip < 0:
        raise UserInputError(f"clip_skip must be >= 0 (diffusers numbering, 0 = last layer), got {clip_skip}")
    return clip_skip


def tokenize(tokenizer: Any, texts: list[str], what: str = "CLIP", max_length: int | None = None) -> Any:
    """Padded, truncated token ids; warns when a prompt is cut."""
    max_length = max_length or tokenizer.model_max_length
    for text in texts:
        n = len(tokenizer(text).input_ids)
        if n > max_length:
            logger.warning("prompt %r has %d tokens; %s reads only the first %d", text, n, what, max_length)
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def encode_last_normed(te: Any, tokenizer: Any, texts: list[str], clip_skip: int) -> Tensor:
    """(P, L, D) hidden states of one CLIP encoder, `clip_skip` layers from the end, after the final LayerNorm."""
    tokens = tokenize(tokenizer, texts)
    ids = tokens.input_ids.to(te.device)
    # Only a few fine-tuned encoders were trained with a padding mask; CLIP itself attends to the padding.
    mask = tokens.attention_mask.to(te.device) if getattr(te.config, "use_attention_mask", False) else None
    if clip_skip == 0:
        return te(ids, attention_mask=mask)[0]  # (P, L, D), after the final LayerNorm
    hidden = te(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    # transformers 5 flattened CLIPTextModel (no `text_model` level); diffusers 0.42 still reads
    # `text_encoder.text_model.final_layer_norm` and fails (huggingface/diffusers#14124).
    return getattr(te, "text_model", te).final_layer_norm(hidden)


def encode_penultimate_pair(pipe: Any, texts: list[str], clip_skip: int) -> tuple[Tensor, Tensor]:
    """(P, L, D1 + D2) both encoders' hidden states side by side, and (P, D2) text_encoder_2's pooled output."""
    states = []
    for tokenizer, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = te(tokenize(tokenizer, texts).input_ids.to(te.device), output_hidden_states=True)
        states.append(out.hidden_states[-(clip_skip + 2)])
    return torch.cat(states, dim=-1), out.text_embeds


def encode_pooled(te: Any, tokenizer: Any, texts: list[str]) -> Tensor:
    """(P, D) CLIP's pooled output (the final state at the end token), as FLUX reads it."""
    ids = tokenize(tokenizer, texts).input_ids.to(te.device)
    return te(ids, output_hidden_states=False).pooler_output


def kohya_clip_embeddings(
    tokenizers: Sequence,
    text_encoders: Sequence[nn.Module],
    captions: list[str],
    clip_skip: int = 1,
    max_token_length: int | None = None,
) -> dict[str, Tensor]:
    """Prompt embeddings as the UNet gets them in kohya's trainers, for SD1.5 (one encoder) or SDXL (two);
    differentiable (a text-encoder LoRA trains through it).

    SD1.5: hidden states of layer -clip_skip (kohya numbering), through the final layer norm as kohya and A1111
    do -> {"encoder_hidden_states": (B, 77, D)}. SDXL: both encoders' penultimate hidden states concatenated,
    plus text_encoder_2's projected pooled output -> also {"pooled_prompt_embeds": (B, D2)}; SDXL fixes the
    layer, so clip_skip is ignored there (as kohya's sdxl_train_network).
    max_token_length 150 / 225: kohya's 75-token windows (families/long_prompts.py) -> (B, 2 + 75 n, D); SDXL's
    pooled embedding is the first window's.
    """
    from lorafuse.families.long_prompts import chunked_input_ids, merge_windows

    hidden, out = [], {}
    batch = len(captions)
    for tok, te in zip(tokenizers, text_encoders, strict=True):
        if max_token_length is not None and max_token_length > tok.model_max_length - 2:
            ids = chunked_input_ids(tok, captions, max_token_length).flatten(0, 1)  # (B * n, 77)
        else:
            ids = tok(
                captions,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        windows = ids.shape[0] // batch
        res = te(ids.to(next(te.parameters()).device), output_hidden_states=True)
        if len(text_encoders) == 2:
            states = res.hidden_states[-2]
            if hasattr(res, "text_embeds"):
                out["pooled_prompt_embeds"] = res.text_embeds[::windows].float()  # the first window's
        elif clip_skip == 1:
            states = res.last_hidden_state
        else:
            # transformers 5 put final_layer_norm on CLIPTextModel itself; 4.x has it under text_model.
            norm = te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm
            states = norm(res.hidden_states[-clip_skip])
        hidden.append(merge_windows(states, batch, tok.model_max_length) if windows > 1 else states)
    out["encoder_hidden_states"] = torch.cat(hidden, dim=-1).float()
    return out
