"""The throughput benchmark's re-implementation of diffusers' example loops gives the denoiser the same text
conditioning as lorafuse's trainer, so the two trainers do the same work per step (the run itself is a
benchmark, smoke-run by hand: `python -m benchmarks.train_throughput --smoke`)."""

import pytest
import torch
from benchmarks.train_throughput import _example_text

from lorafuse.models.load import load_base_pipeline
from lorafuse.train.cache import text_embeddings

CAPTIONS = ["a photo of a sks robot, in flat color style", "a red mug"]


@pytest.mark.parametrize("base, family", [("sd15-tiny", "sd15"), ("sdxl-tiny", "sdxl")])
def test_example_text_conditioning_matches_lorafuse_training(base: str, family: str) -> None:
    pipe = load_base_pipeline(base)
    tokenize, encode = _example_text(pipe, size=64)
    ids = [tokenize(c) for c in CAPTIONS]
    batch = {"input_ids": [torch.stack(per) for per in zip(*ids, strict=True)],
             "sizes": [((64, 64), (0, 0))] * len(CAPTIONS)}  # fmt: skip
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if len(encoders) == 2 else [])
    with torch.no_grad():
        states, added = encode(batch)
        ours = text_embeddings(tokenizers, encoders, CAPTIONS, family=family)
    assert states.shape == ours["encoder_hidden_states"].shape
    torch.testing.assert_close(states, ours["encoder_hidden_states"])
    if family == "sdxl":
        torch.testing.assert_close(added["text_embeds"], ours["pooled_prompt_embeds"])
        assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * len(CAPTIONS)
    else:
        assert added == {}
