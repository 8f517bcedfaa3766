"""The CRAFT expert encoder (CRAFT-LoRA paper §3.4.1, App. B.1; docs/algorithms.md §7.4): prompt spans -> (λ_c, λ_s).

    e_id = E_id(concept ID)     e_c = E_c(text embedding of the content span)     e_s = E_s(... style span)
    (λ_c, λ_s) = softplus(H([e_id | e_c | e_s]))  >= 0          each E_* an MLP to 64-d, H the aggregation head

Notation map: `id_mlp`, `content_mlp`, `style_mlp` are E_id, E_c, E_s; `head` is H; `embed_dim` = 64.

What it is trained on is ours (the paper does not say): examples (concept ID, content span, style span, best λ
pair), the λ pair that scored best in a λ grid for that prompt (oracle scores on the built-in world, CLIP/DINO
for real models). It must generalise to span texts it never saw ("semantic extension", types I–III), so the text
branches carry the signal and the ID branch is trained with ID dropout: each example's ID is replaced by 0
("unknown concept") with probability `id_dropout`, which is also the ID used for concepts not in training.

Text embeddings come from a function `texts -> (N, D)`; `pipeline_text_embedder(pipe)` is the mean of the text
encoder's last hidden states over the prompt's tokens (both encoders side by side for SDXL). The file stores the
dimensions so a mismatched embedder is an error, not garbage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lorafuse.errors import UserInputError
from lorafuse.utils.atomic import atomic_save_safetensors

TextEmbedder = Callable[[Sequence[str]], torch.Tensor]
UNKNOWN_ID = 0


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class ExpertEncoder(nn.Module):
    """ids (N,) long, content / style embeddings (N, D) -> (N, 2) = (λ_c, λ_s) >= 0."""

    def __init__(
        self, text_dim: int, num_ids: int = 1, id_dim: int = 16, hidden: int = 128, embed_dim: int = 64
    ):
        super().__init__()
        self.config = {"text_dim": text_dim, "num_ids": num_ids, "id_dim": id_dim, "hidden": hidden,
                       "embed_dim": embed_dim}  # fmt: skip
        self.ids = nn.Embedding(num_ids + 1, id_dim)  # row 0: the unknown concept
        self.id_mlp = _mlp(id_dim, hidden, embed_dim)
        self.content_mlp = _mlp(text_dim, hidden, embed_dim)
        self.style_mlp = _mlp(text_dim, hidden, embed_dim)
        self.head = _mlp(3 * embed_dim, hidden, 2)

    def forward(self, ids: torch.Tensor, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        ids = torch.where((ids >= 0) & (ids <= self.config["num_ids"]), ids, torch.zeros_like(ids))
        e = torch.cat([self.id_mlp(self.ids(ids)), self.content_mlp(content), self.style_mlp(style)], dim=1)
        return F.softplus(self.head(e))  # (N, 3·64) -> (N, 2), non-negative as the paper's λ

    @torch.no_grad()
    def predict(
        self, embed: TextEmbedder, concept_id: int, content_span: str, style_span: str
    ) -> tuple[float, float]:
        vectors = embed([content_span, style_span]).float()
        if vectors.shape[1] != self.config["text_dim"]:
            raise UserInputError(
                f"expert encoder expects {self.config['text_dim']}-d text embeddings, this text encoder gives "
                f"{vectors.shape[1]}-d: it was trained with another base model"
            )
        out = self.eval()(torch.tensor([concept_id]), vectors[:1], vectors[1:])[0]
        return float(out[0]), float(out[1])


def pipeline_text_embedder(pipe: Any) -> TextEmbedder:
    """Mean of each text encoder's last hidden state over the prompt's tokens (BOS to EOS, no padding)."""

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        parts = []
        for tok_name, te_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, te_name, None)
            if tokenizer is None or encoder is None:
                continue
            tokens = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")  # fmt: skip
            hidden = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True).hidden_states[-1]
            mask = tokens.attention_mask.to(hidden).unsqueeze(-1)  # (N, L, 1): the prompt's own tokens
            parts.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(parts, dim=1).float().cpu()

    return embed


@dataclass(frozen=True)
class ExpertExample:
    """One training row: the best (λ_c, λ_s) found for a prompt with these spans."""

    concept_id: int
    content_span: str
    style_span: str
    lambda_c: float
    lambda_s: float


def train_expert(
    examples: Sequence[ExpertExample], embed: TextEmbedder, *, steps: int = 500, lr: float = 3e-3,
    weight_decay: float = 1e-4, id_dropout: float = 0.2, hidden: int = 128, seed: int = 0,
) -> ExpertEncoder:  # fmt: skip
    """Fit an `ExpertEncoder` to the examples' λ pairs (MSE, AdamW, full batch); returns it in eval mode."""
    if not examples:
        raise UserInputError("train_expert needs at least one example")
    bad = [e for e in examples if e.lambda_c < 0 or e.lambda_s < 0 or e.concept_id < 0]
    if bad:
        raise UserInputError(f"examples need concept_id >= 0 and λ >= 0 (softplus output); e.g. {bad[0]}")
    texts = sorted({t for e in examples for t in (e.content_span, e.style_span)})
    table = dict(zip(texts, embed(texts).float(), strict=True))  # each distinct span embedded once
    content = torch.stack([table[e.content_span] for e in examples])
    style = torch.stack([table[e.style_span] for e in examples])
    ids = torch.tensor([e.concept_id for e in examples])
    target = torch.tensor([[e.lambda_c, e.lambda_s] for e in examples], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExpertEncoder(content.shape[1], int(ids.max()), hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        drop = torch.rand(len(ids), generator=g) < id_dropout
        loss = F.mse_loss(model(torch.where(drop, torch.zeros_like(ids), ids), content, style), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def save_expert(model: ExpertEncoder, path: str | Path) -> Path:
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # an interrupted save must not leave a half file that load_expert trusts
    return atomic_save_safetensors(path, tensors, {"lorafuse_craft_expert": json.dumps(model.config)})


def load_expert(path: str | Path) -> ExpertEncoder:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for "not a safetensors file"
        raise UserInputError(f"{path}: not a readable expert encoder file ({e})") from e
    if "lorafuse_craft_expert" not in meta:
        raise UserInputError(f"{path}: not a CRAFT expert encoder (no lorafuse_craft_expert metadata)")
    model = ExpertEncoder(**json.loads(meta["lorafuse_craft_expert"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
