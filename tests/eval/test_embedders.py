"""CLIP-I, CLIP-T and DINO plumbing on tiny random models saved to disk, against a slow reference that does the
preprocessing by hand (PIL resize as the processor config says, centre crop, rescale, normalise) and picks the
token and the normalisation itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, Dinov2Model, ViTModel

from lorafuse.errors import UserInputError
from lorafuse.eval.embedders import ClipEmbedder, DinoEmbedder, clean_prompt


def images(n: int = 3, h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def reference_pixels(image: np.ndarray, cfg: dict) -> torch.Tensor:
    """The preprocessing written out: the slow reference."""
    pil = Image.fromarray(image)
    size = cfg["size"]
    if "shortest_edge" in size:
        s, (w, h) = size["shortest_edge"], pil.size
        short, long = min(w, h), max(w, h)
        new_long = int(s * long / short)
        new_w, new_h = (s, new_long) if w <= h else (new_long, s)
    else:
        new_w, new_h = size["width"], size["height"]
    arr = np.asarray(pil.resize((new_w, new_h), resample=cfg["resample"])).astype(np.float32)
    if cfg.get("do_center_crop"):
        ch, cw = cfg["crop_size"]["height"], cfg["crop_size"]["width"]
        top, left = (arr.shape[0] - ch) // 2, (arr.shape[1] - cw) // 2
        arr = arr[top : top + ch, left : left + cw]
    arr = (arr / 255.0 - np.array(cfg["image_mean"], np.float32)) / np.array(cfg["image_std"], np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None].float()


def processor_cfg(folder) -> dict:
    import json

    return json.loads((folder / "preprocessor_config.json").read_text())


def test_clean_prompt_drops_markers_and_triggers() -> None:
    assert clean_prompt("A photo of a sks teapot <c> in ink style <s>") == "A photo of a teapot in ink style"
    assert clean_prompt("a SKS, teapot in zwx style", triggers=("sks", "zwx")) == "a, teapot in style"
    assert clean_prompt("a sksy teapot") == "a sksy teapot"  # whole words only


def test_clip_image_embeds_match_slow_reference(clip_dir) -> None:
    clip = ClipEmbedder.load(clip_dir)
    imgs = images()
    cfg = processor_cfg(clip_dir)
    px = torch.cat([reference_pixels(im, cfg) for im in imgs])
    np.testing.assert_allclose(clip.pixel_values(imgs).numpy(), px.numpy(), atol=1e-5)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=px).last_hidden_state  # (N, 1 + patches, 32)
        cls = model.vision_model.post_layernorm(hidden[:, 0])  # CLS token, then CLIP's final layernorm
        ref = F.normalize(model.visual_projection(cls), dim=-1)
        mean_tok = F.normalize(
            model.visual_projection(model.vision_model.post_layernorm(hidden.mean(1))), dim=-1
        )
    ours = clip.image_embeds(imgs)
    assert (
        ref - mean_tok
    ).abs().max() > 1e-3  # the token choice matters, so the comparison below means something
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(imgs)))

    refs = images(2, 32, 32, seed=5)
    sim = clip.image_similarity(imgs, refs)
    expected = (ref @ clip.image_embeds(refs).T).mean(1).double().numpy()
    np.testing.assert_allclose(sim, expected, atol=1e-6)
    # float images in [0, 1] score as the uint8 image they round to
    np.testing.assert_allclose(clip.image_similarity(imgs / 255.0, refs), sim, atol=1e-6)


def test_clip_text_uses_cleaned_prompt_and_eos_token(clip_dir) -> None:
    clip = ClipEmbedder.load(clip_dir)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    imgs = images(2)
    prompt = "a photo of a sks teapot <c> in ink style <s>"
    score = clip.text_similarity(imgs, prompt, triggers=("sks",))

    ids = clip.tokenizer("a photo of a teapot in ink style", return_tensors="pt")["input_ids"]
    eos = int((ids[0] == clip.tokenizer.eos_token_id).nonzero()[0])
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids).last_hidden_state  # after final_layer_norm
        txt = F.normalize(model.text_projection(hidden[:, eos]), dim=-1)
    expected = (clip.image_embeds(imgs) @ txt.T)[:, 0].double().numpy()
    np.testing.assert_allclose(score, expected, atol=1e-6)
    raw = clip.text_similarity(imgs, prompt, triggers=())
    assert not np.allclose(raw, score)  # the trigger word really was removed


@pytest.mark.parametrize("which", ["vit", "dinov2"])
def test_dino_uses_cls_after_layernorm_not_pooler(which, vit_dir, dinov2_dir) -> None:
    folder = vit_dir if which == "vit" else dinov2_dir
    dino = DinoEmbedder.load(folder)
    imgs = images()
    px = torch.cat([reference_pixels(im, processor_cfg(folder)) for im in imgs])
    np.testing.assert_allclose(dino.pixel_values(imgs).numpy(), px.numpy(), atol=1e-5)

    cls_ = ViTModel if which == "vit" else Dinov2Model
    model = cls_.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model.embeddings(px)  # (N, 1 + patches, 32), CLS first
        for layer in model.layers if hasattr(model, "layers") else model.encoder.layer:
            out = layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        normed = model.layernorm(hidden)
        ref = F.normalize(normed[:, 0], dim=-1)
        before_norm = F.normalize(hidden[:, 0], dim=-1)
    ours = dino.image_embeds(imgs)
    assert (ref - before_norm).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    if which == "vit":
        with torch.no_grad():
            pooled = F.normalize(model.pooler(normed), dim=-1)
        assert (pooled - ours).abs().max() > 1e-2  # the untrained pooler would give something else


def test_wrong_model_type_names_path_and_expectation(clip_dir, vit_dir, tmp_path) -> None:
    with pytest.raises(UserInputError, match=rf"{vit_dir}: holds a 'vit' model; expected a CLIP model"):
        ClipEmbedder.load(vit_dir)
    with pytest.raises(UserInputError, match=rf"{clip_dir}: holds a 'clip' model; expected a DINO model"):
        DinoEmbedder.load(clip_dir)
    with pytest.raises(UserInputError, match="cannot read a model config"):
        DinoEmbedder.load(tmp_path / "nothing-here")


def test_missing_processor_config_is_an_error(vit_dir, tmp_path) -> None:
    import shutil

    folder = tmp_path / "noproc"
    shutil.copytree(vit_dir, folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(UserInputError, match="no image processor config"):
        DinoEmbedder.load(folder)
