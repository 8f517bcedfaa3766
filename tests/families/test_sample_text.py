"""Sampling prompts as kohya's sampler (its long-prompt-weighting pipeline) and A1111 encode them: 75-token windows
each kept whole (77 n states), (word:1.2) weights with the mean restored, A1111's BREAK; checked against ids and
states built by hand, and against the diffusers pipeline's own encoding where the two must agree."""

from __future__ import annotations

import pytest
import torch

from lorafuse.families.sample_text import _windows, parse_weights, prompt_tokens, sample_embeddings
from lorafuse.models.tiny import TINY_WORDS, tiny_pipeline
from lorafuse.train.sampling_during_training import long_prompt_kwargs

WORDS = [w for w in TINY_WORDS if w.isalpha()][:20]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return tiny_pipeline(request.param)


def _text(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n))


def _encoders(pipe):
    toks = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    encs = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    return toks, encs


def test_attention_syntax():
    assert parse_weights("a (red:1.5) [dog]") == [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("dog", pytest.approx(1 / 1.1))]
    ((text, w),) = parse_weights("((sky))")
    assert text == "sky" and w == pytest.approx(1.21)
    assert parse_weights(r"\(literal\) x") == [("(literal) x", 1.0)]
    assert parse_weights("a (b:1.0) c") == [("a b c", 1.0)]  # equal weights are one text
    assert parse_weights("(open end") == [("open end", pytest.approx(1.1))]
    assert parse_weights("a cat BREAK a (dog:2)") == [("a cat", 1.0), ("BREAK", -1.0), ("a ", 1.0), ("dog", 2.0)]
    assert parse_weights("BREAKFAST at noon") == [("BREAKFAST at noon", 1.0)]  # only the word on its own


def test_windows_are_cut_as_kohyas_sampler_cuts_them(pipe):
    for tok in _encoders(pipe)[0]:
        ids = tok(_text(100), add_special_tokens=False).input_ids
        assert len(ids) == 100
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        rows = _windows(tok, ids, 2).tolist()
        assert rows[0] == [bos, *ids[:75], eos]  # the text runs on: EOS closes the window
        assert rows[1] == [bos, *ids[75:], eos] + [pad] * 50


def test_break_starts_a_new_window(pipe):
    tok = pipe.tokenizer
    first, second = _text(5), _text(4, offset=7)
    ids, weights = prompt_tokens(tok, f"{first} BREAK {second}")
    head = tok(first, add_special_tokens=False).input_ids
    tail = tok(second, add_special_tokens=False).input_ids
    assert ids == head + [tok.eos_token_id] + [tok.pad_token_id] * (74 - len(head)) + tail
    assert len(weights) == len(ids)
    rows = _windows(tok, ids, 2).tolist()
    assert rows[1][1 : 1 + len(tail)] == tail  # the second window begins with the text after BREAK


def test_a_plain_short_prompt_matches_the_pipelines_own_encoding(pipe):
    """Where kohya's sampler and diffusers must agree (one window, no weights), they do: SD1.5, SDXL's two
    encoders and pooled embedding; SD1.5's clip skip 2 against its definition (layer -2, final layer norm), as
    diffusers' own clip_skip path fails on transformers 5's CLIPTextModel."""
    toks, encs = _encoders(pipe)
    prompt = _text(12)
    with torch.no_grad():
        ours = sample_embeddings(toks, encs, [prompt])
        ref = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        torch.testing.assert_close(ours["encoder_hidden_states"], ref[0].float(), rtol=1e-5, atol=1e-5)
        if len(encs) == 2:
            torch.testing.assert_close(ours["pooled_prompt_embeds"], ref[2].float(), rtol=1e-5, atol=1e-5)
            return
        skipped = sample_embeddings(toks, encs, [prompt], clip_skip=2)["encoder_hidden_states"]
        ids = toks[0](prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        enc = encs[0]
        norm = enc.final_layer_norm if hasattr(enc, "final_layer_norm") else enc.text_model.final_layer_norm
        expected = norm(enc(ids, output_hidden_states=True).hidden_states[-2])
        torch.testing.assert_close(skipped, expected.float(), rtol=1e-5, atol=1e-5)
        assert long_prompt_kwargs(pipe, prompt, None, clip_skip=1) is not None  # the pipeline's path would fail


def test_long_prompt_keeps_every_window_whole_and_weights_keep_the_mean(pipe):
    toks, encs = _encoders(pipe)
    plain, weighted = _text(100), f"{_text(50)} (dog:1.5) {_text(49, offset=3)}"
    with torch.no_grad():
        got = sample_embeddings(toks, encs, [plain, weighted])
        states = got["encoder_hidden_states"]
        assert states.shape[:2] == (2, 154)  # 2 windows x 77 states, BOS and EOS of each kept
        # window by window, the encoder's own states of the hand-cut rows
        expected = []
        for tok, enc in zip(toks, encs, strict=True):
            ids = tok(plain, add_special_tokens=False).input_ids
            rows = torch.tensor([[tok.bos_token_id, *ids[:75], tok.eos_token_id],
                                 [tok.bos_token_id, *ids[75:], tok.eos_token_id] + [tok.pad_token_id] * 50])  # fmt: skip
            out = enc(rows, output_hidden_states=True)
            layer = out.hidden_states[-2] if len(encs) == 2 else out.last_hidden_state
            expected.append(layer.reshape(1, 154, -1))
        torch.testing.assert_close(states[:1], torch.cat(expected, -1).float(), rtol=1e-5, atol=1e-5)
        # the weighted one: unweighted states x per-token weight x (old mean / new mean)
        unweighted = sample_embeddings(toks, encs, [weighted.replace("(dog:1.5)", "dog")])["encoder_hidden_states"]
        n_before = len(toks[0](_text(50), add_special_tokens=False).input_ids)
        w = torch.ones(1, 154, 1)
        w[0, 1 + n_before] = 1.5  # BOS of the first window, then the 50-word text, then dog
        parts, start = [], 0
        for enc in encs:  # each encoder's states weighted and renormalised on their own, then joined (SDXL)
            plain_part = unweighted[..., start : start + enc.config.hidden_size]
            scaled = plain_part * w
            parts.append(scaled * (plain_part.mean() / scaled.mean()))
            start += enc.config.hidden_size
        torch.testing.assert_close(states[1:], torch.cat(parts, -1), rtol=1e-5, atol=1e-6)


def test_samples_render_with_long_weighted_and_break_prompts(pipe):
    prompt = f"{_text(90)}, (dog:1.3) BREAK {_text(10)}"
    kwargs = long_prompt_kwargs(pipe, prompt, None, None)
    assert kwargs["prompt_embeds"].shape[1] == 231  # 90 + 2 + BREAK-padding -> 3 windows, 77 each
    assert long_prompt_kwargs(pipe, _text(10), None, None) is None  # the pipeline's own encoding
    image = pipe(**kwargs, num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.shape == (64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_kohya_prompt_file_negative_prompts_reach_the_sampler(pipe, tmp_path):
    from lorafuse.train.kohya_prompts import read_prompt_file, split_negative

    f = tmp_path / "prompts.txt"
    f.write_text("# comment\nsks dog on a beach --n blurry, (red:1.2) --w 768 --d 5\nsks cat\n")
    prompts, dropped = read_prompt_file(f)
    assert prompts == ["sks dog on a beach --n blurry, (red:1.2)", "sks cat"] and dropped == ["--w", "--d"]
    assert split_negative(prompts[0]) == ("sks dog on a beach", "blurry, (red:1.2)")
    assert split_negative(prompts[1]) == ("sks cat", "")
    toks, encs = _encoders(pipe)
    kwargs = long_prompt_kwargs(pipe, *split_negative(prompts[0])[:1], None, None, split_negative(prompts[0])[1])
    with torch.no_grad():
        ref = sample_embeddings(toks, encs, ["sks dog on a beach", "blurry, (red:1.2)"])
    torch.testing.assert_close(kwargs["negative_prompt_embeds"].float(), ref["encoder_hidden_states"][1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_grid_with_a_half_precision_base_on_cpu(pipe, dtype, tmp_path):
    """mixed_precision fp16 / bf16 on a CPU: the frozen UNet and text encoders in half precision hand half latents
    to the float32 VAE decoder, and accelerate's autocast is off on a CPU for fp16 ('Input type (c10::Half) and
    bias type (float) should be the same'); with CPU autocast (bf16) as well."""
    from lorafuse.train.sampling_during_training import sample_grid

    half = tiny_pipeline("sdxl" if hasattr(pipe, "text_encoder_2") else "sd15")
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(half, name, None) is not None:
            getattr(half, name).to(dtype)
    out = sample_grid(half, ["sks dog --n blurry", "(red:1.2) cat"], tmp_path / "grid.png", steps=1, seed=0,
                      resolution=64, autocast=None)  # fmt: skip
    assert out.is_file() and half.vae.dtype == torch.float32
    sample_grid(half, ["sks dog"], tmp_path / "grid2.png", steps=1, seed=0, resolution=64,
                autocast=torch.autocast("cpu", dtype=dtype))  # fmt: skip
