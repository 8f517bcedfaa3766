"""open_clip CLIP metrics (the `metrics` extra): the loader's messages without the package or with a broken one,
and, where open_clip imports, a random-weight model built offline scored against open_clip's own calls."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.eval.embedders import OpenClipEmbedder
from lorafuse.utils.extras import MissingExtraError


def test_without_open_clip_the_message_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed: `import open_clip` fails
    with pytest.raises(MissingExtraError) as err:
        OpenClipEmbedder.load("ViT-B-32", tmp_path / "w.safetensors")
    assert str(err.value) == (
        "open_clip CLIP metrics (metrics.clip_arch) needs the optional package open_clip_torch, which is not "
        "installed; install it with: pip install 'lorafuse[metrics]'"
    )


def test_a_broken_open_clip_install_is_one_clear_error(monkeypatch, tmp_path):
    """open_clip imports torchvision; a torchvision built for another torch fails inside its import."""
    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "open_clip":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args, **kwargs)

    monkeypatch.setattr("lorafuse.utils.extras.importlib.import_module", broken)
    with pytest.raises(UserInputError, match=r"open_clip_torch is installed but does not import .*torchvision::nms"):
        OpenClipEmbedder.load("ViT-B-32", tmp_path / "w.safetensors")


def test_the_grid_needs_weights_with_clip_arch():
    from lorafuse.errors import ConfigError
    from lorafuse.eval.grid_config import MetricsConfig
    from lorafuse.eval.scoring import GridScorer

    with pytest.raises(ConfigError, match="metrics.clip_arch = 'ViT-B-32' needs metrics.clip, the weights file"):
        GridScorer(MetricsConfig(clip_arch="ViT-B-32", oracle=False), ["sd15-tiny"], "a teapot")


def _open_clip():
    try:
        return importlib.import_module("open_clip")
    except Exception as e:  # noqa: BLE001 - any import failure means: no usable open_clip here
        pytest.skip(f"open_clip_torch (lorafuse[metrics]) does not import here ({type(e).__name__}: {e}); it needs "
                    "a torchvision built for this torch, which PyPI lacks for the CPU torch")  # fmt: skip


# a tiny open_clip CLIP: the real architecture (ViT image tower, text transformer, projections) at toy width
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_weights(tmp_path):
    open_clip = _open_clip()
    from safetensors.torch import save_file

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "lorafuse-tiny-clip.json").write_text(json.dumps(TINY))
    wider = {**TINY, "text_cfg": {**TINY["text_cfg"], "width": 48}}  # another architecture, as cheap
    (tmp_path / "cfg" / "lorafuse-tiny-clip-wide.json").write_text(json.dumps(wider))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    model = open_clip.create_model("lorafuse-tiny-clip", pretrained=None)  # random weights, nothing downloads
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return open_clip, path


def test_open_clip_embeds_match_open_clips_own_calls(tiny_weights):
    open_clip, path = tiny_weights
    emb = OpenClipEmbedder.load("lorafuse-tiny-clip", path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    model, _, preprocess = open_clip.create_model_and_transforms("lorafuse-tiny-clip", pretrained=str(path))
    from PIL import Image

    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
        ref_img = torch.nn.functional.normalize(model.eval().encode_image(x), dim=-1)
        tokens = open_clip.get_tokenizer("lorafuse-tiny-clip")(["a photo of a teapot"])
        ref_txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(emb.image_embeds(images), ref_img, atol=1e-5)
    got = emb.text_similarity(images, "a photo of a sks teapot <c>", triggers=("sks",))  # cleaned prompt
    np.testing.assert_allclose(got, (ref_img @ ref_txt.T)[:, 0].double().numpy(), atol=1e-5)


def test_open_clip_loader_errors(tiny_weights, tmp_path):
    _, path = tiny_weights
    with pytest.raises(UserInputError, match="'ViT-Nope' is not an open_clip architecture"):
        OpenClipEmbedder.load("ViT-Nope", path)
    with pytest.raises(UserInputError, match="missing.safetensors: open_clip weights file not found"):
        OpenClipEmbedder.load("lorafuse-tiny-clip", tmp_path / "missing.safetensors")
    with pytest.raises(UserInputError, match=r"tiny.safetensors: cannot load it as open_clip lorafuse-tiny-clip-wide"):
        OpenClipEmbedder.load("lorafuse-tiny-clip-wide", path)  # the wrong architecture for these weights
