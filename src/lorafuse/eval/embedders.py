"""CLIP-I, CLIP-T and DINO similarities (docs/algorithms.md §7.6) with models the user has on disk.

    clip = ClipEmbedder.load("/models/clip-vit-large-patch14")      # or a hub id already in the local cache
    clip.image_similarity(images, references)   # CLIP-I: (N,) mean cosine of projected image embeds
    clip.text_similarity(images, prompts, triggers=("sks",))   # CLIP-T: cosine to the cleaned prompt
    dino = DinoEmbedder.load("/models/dino-vits16")
    dino.image_similarity(images, references)   # CLS token of last_hidden_state (after the final layernorm)
    clip = OpenClipEmbedder.load("ViT-B-32", "/models/vit-b-32.safetensors")   # open_clip (lorafuse[metrics])

Which vector:
- CLIP-I: `visual_projection(post_layernorm(CLS))`, i.e. `CLIPVisionModelWithProjection.image_embeds`. Computed
  from a `CLIPModel` through its parts because `CLIPVisionModelWithProjection.from_pretrained` on a full CLIP
  folder does not take the top-level `projection_dim` (a tiny test model fails; real ones copy it by luck).
- CLIP-T: `text_projection(final_layer_norm(EOS token))`, CLIP's own pooled text embedding.
- DINO: `last_hidden_state[:, 0]`. HF `ViTModel` applies the final layernorm before its pooler; the pooler
  (dense + tanh) was never trained in the DINO checkpoints, so we load ViT without it. `Dinov2Model`'s
  pooler_output is that same CLS token.
Preprocessing is the model's own image processor (resize, centre crop, normalise as its
preprocessor_config.json says): without torchvision transformers uses the PIL variant, which is what
tests/eval/test_embedders.py checks against a hand-written reference.
Nothing downloads: `local_files_only=True` unless the caller says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorafuse.errors import UserInputError
from lorafuse.fusion.markers import normalise, strip_markers
from lorafuse.utils.images import to_uint8

CLIP_TYPES = ("clip", "clip_vision_model")
DINO_TYPES = ("vit", "dinov2", "dinov2_with_registers")


def clean_prompt(prompt: str, triggers: Sequence[str] = ("sks",)) -> str:
    """The prompt CLIP-T compares with: without `<c>`/`<s>` markers (the grammar the methods read,
    `fusion.markers`) and trigger words, which mean nothing to CLIP and would only add noise
    ('a photo of a sks teapot <c>' -> 'a photo of a teapot')."""
    text = strip_markers(prompt)
    for word in triggers:
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", text, flags=re.IGNORECASE)
    return normalise(text)  # 'sks,' removed leaves ' ,'


def as_pil_list(images) -> list:
    """(N, H, W, 3) uint8 or [0, 1] float arrays, one (H, W, 3) array, PIL images or a list of them -> RGB PIL.

    Float arrays are taken as [0, 1] (what `lorafuse.fuse` returns) and rounded to uint8 first, so a score
    does not depend on whether the image went through a PNG file."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        images = images[None] if images.ndim == 3 else images
        seq = list(images)
    else:
        seq = list(images) if isinstance(images, (list, tuple)) else [images]
    out = []
    for im in seq:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
            continue
        arr = np.asarray(im)
        if arr.dtype != np.uint8:
            arr = to_uint8(arr)
        out.append(Image.fromarray(arr).convert("RGB"))
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report table for every harmless unexpected key (the ViT pooler we drop)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _model_type(path: str, local_files_only: bool, expected: str, allowed: Collection[str]) -> str:
    """The checkpoint's `model_type`, refused unless it is one of `allowed` (`expected` says which in words)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        where = (
            "no such folder, or not in the local Hugging Face cache" if not os.path.isdir(path) else str(e)
        )
        raise UserInputError(f"{path}: cannot read a model config ({where}); expected {expected}") from None
    if config.model_type not in allowed:
        raise UserInputError(f"{path}: holds a '{config.model_type}' model; expected {expected}")
    return config.model_type


def _load(cls, path: str, local_files_only: bool, what: str, **kwargs):
    """`cls.from_pretrained`, refusing checkpoints with missing weights (transformers would randomise them and
    only warn, and a metric on random weights looks like a real number)."""
    with _quiet_transformers():
        model, info = cls.from_pretrained(
            path, local_files_only=local_files_only, output_loading_info=True, **kwargs
        )
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise UserInputError(
            f"{path}: the {what} checkpoint lacks {len(missing)} weights ({', '.join(missing[:4])} ...)"
        )
    return model.eval()


def _processor(path: str, local_files_only: bool):
    from transformers import AutoImageProcessor

    try:
        with _quiet_transformers():  # the "no torchvision, using the PIL processor" notice is expected here
            return AutoImageProcessor.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise UserInputError(
            f"{path}: no image processor config (preprocessor_config.json): lorafuse preprocesses exactly as the "
            f"model's processor says and does not guess ({e})"
        ) from None


class _Embedder:
    def __init__(self, processor, source: str, batch: int = 16, device: str | torch.device = "cpu"):
        self.processor = processor
        self.source = source
        self.batch = batch
        self.device = torch.device(device)

    def pixel_values(self, images) -> torch.Tensor:
        """(N, 3, h, w) exactly as the model's image processor prepares them."""
        return self.processor(images=as_pil_list(images), return_tensors="pt")["pixel_values"]

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        """(N, D) unit vectors."""
        pils = as_pil_list(images)
        if not pils:
            raise UserInputError("no images to embed")
        out = []
        for i in range(0, len(pils), self.batch):
            x = self.pixel_values(pils[i : i + self.batch]).to(self.device)
            out.append(F.normalize(self._forward(x).float(), dim=-1).cpu())
        return torch.cat(out)

    def image_similarity(self, images, references) -> np.ndarray:
        """(N,) mean cosine of each image to all references (CLIP-I / DINO content similarity)."""
        from lorafuse.eval.metrics import mean_cosine

        refs = references if isinstance(references, torch.Tensor) else self.image_embeds(references)
        return mean_cosine(self.image_embeds(images), refs)


class ClipEmbedder(_Embedder):
    """CLIP-I and CLIP-T. `vision`: a CLIPModel or CLIPVisionModelWithProjection; `text` None for vision-only."""

    def __init__(self, model, processor, tokenizer=None, source: str = "", **kwargs):
        super().__init__(processor, source, **kwargs)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike, *, local_files_only: bool = True, **kwargs) -> ClipEmbedder:
        from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

        path = os.fspath(path)
        expected = "a CLIP model (model_type 'clip', e.g. openai/clip-vit-large-patch14)"
        kind = _model_type(path, local_files_only, expected, CLIP_TYPES)
        processor = _processor(path, local_files_only)
        if kind == "clip_vision_model":  # an image encoder alone (IP-Adapter ships these): CLIP-I only
            return cls(_load(CLIPVisionModelWithProjection, path, local_files_only, "CLIP vision"), processor,
                       None, path, **kwargs)  # fmt: skip
        model = _load(CLIPModel, path, local_files_only, "CLIP")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # CLIP-I still works; text_similarity says what is missing
        return cls(model, processor, tokenizer, path, **kwargs)

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "vision_model") and hasattr(self.model, "text_model"):
            pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output  # post_layernorm(CLS)
            return self.model.visual_projection(pooled)
        return self.model(pixel_values=pixel_values).image_embeds

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors of CLIP's pooled, projected text embedding (texts used as given)."""
        if self.tokenizer is None or not hasattr(self.model, "text_model"):
            raise UserInputError(
                f"{self.source}: CLIP-T needs the text model and tokenizer; this checkpoint lacks them"
            )
        out = []
        for i in range(0, len(texts), self.batch):
            tok = self.tokenizer(list(texts[i : i + self.batch]), padding=True, truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")  # fmt: skip
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            pooled = self.model.text_model(**tok).pooler_output  # final_layer_norm(EOS token)
            out.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out)

    def text_similarity(
        self, images, prompts: str | Sequence[str], triggers: Sequence[str] = ("sks",)
    ) -> np.ndarray:
        """CLIP-T: (N,) cosine of each image to its prompt (one prompt for all, or one per image), after
        `clean_prompt` removed markers and `triggers`."""
        img = self.image_embeds(images)
        prompts = [prompts] * len(img) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(img):
            raise UserInputError(f"{len(prompts)} prompts for {len(img)} images; give one, or one per image")
        txt = self.text_embeds([clean_prompt(p, triggers) for p in prompts])
        return (img.double() * txt.double()).sum(1).numpy()


class DinoEmbedder(_Embedder):
    """DINO (ViT, e.g. facebook/dino-vits16) or DINOv2: the CLS token after the final layernorm."""

    def __init__(self, model, processor, source: str = "", **kwargs):
        super().__init__(processor, source, **kwargs)
        self.model = model.to(self.device)

    @classmethod
    def load(cls, path: str | os.PathLike, *, local_files_only: bool = True, **kwargs) -> DinoEmbedder:
        from transformers import AutoModel, ViTModel

        path = os.fspath(path)
        expected = "a DINO model (model_type 'vit' such as facebook/dino-vits16, or 'dinov2')"
        kind = _model_type(path, local_files_only, expected, DINO_TYPES)
        if kind == "vit":  # no pooler: untrained in DINO checkpoints, and we never read it
            model = _load(ViTModel, path, local_files_only, "DINO ViT", add_pooling_layer=False)
        else:
            model = _load(AutoModel, path, local_files_only, "DINOv2")
        return cls(model, _processor(path, local_files_only), path, **kwargs)

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class OpenClipEmbedder(ClipEmbedder):
    """CLIP-I and CLIP-T with an open_clip model (`pip install 'lorafuse[metrics]'`): an architecture name
    (`open_clip.list_models()`, e.g. 'ViT-B-32') and a local weights file (.safetensors, .bin, .pt). Same vectors
    as `ClipEmbedder`: `encode_image` / `encode_text` are the projected pooled embeddings; preprocessing is the
    model's own evaluation transform. Nothing downloads: the weights must be a file, and architectures whose
    tokenizer would come from the Hugging Face hub are refused."""

    @classmethod
    def load(cls, arch: str, weights: str | os.PathLike, **kwargs) -> OpenClipEmbedder:  # type: ignore[override]
        open_clip = _import_open_clip()
        weights = Path(weights)
        if arch not in open_clip.list_models():
            near = [m for m in open_clip.list_models() if arch.lower()[:5] in m.lower()][:6]
            raise UserInputError(
                f"metrics.clip_arch = {arch!r} is not an open_clip architecture"
                + (f" (close: {', '.join(near)})" if near else " (see open_clip.list_models())")
            )
        if not weights.is_file():
            raise UserInputError(
                f"{weights}: open_clip weights file not found; metrics.clip must be a local file of {arch} "
                "weights (lorafuse downloads nothing)"
            )
        if (open_clip.get_model_config(arch) or {}).get("text_cfg", {}).get("hf_tokenizer_name"):
            raise UserInputError(
                f"{arch}: its tokenizer comes from the Hugging Face hub, which lorafuse does not download; "
                "use a CLIP architecture with open_clip's own tokenizer (e.g. ViT-B-32, ViT-L-14)"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights.resolve()))
        except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:  # open_clip asserts shapes
            raise UserInputError(f"{weights}: cannot load it as open_clip {arch} weights ({e})") from None
        return cls(model.eval(), preprocess, open_clip.get_tokenizer(arch), str(weights), **kwargs)

    def pixel_values(self, images) -> torch.Tensor:
        return torch.stack([self.processor(im) for im in as_pil_list(images)])

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch):
            tokens = self.tokenizer(list(texts[i : i + self.batch])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)


def _import_open_clip():
    """open_clip, or one clear error: not installed (names the extra), or installed but broken (its torchvision
    was built for another torch: the import fails deep inside torchvision)."""
    from lorafuse.utils.extras import require

    try:
        return require("open_clip", "open_clip CLIP metrics (metrics.clip_arch)")
    except (RuntimeError, OSError, AttributeError) as e:
        raise UserInputError(
            f"open_clip_torch is installed but does not import ({type(e).__name__}: {e}); this usually means its "
            f"torchvision does not match torch {torch.__version__}: install the torchvision built for this torch"
        ) from None
