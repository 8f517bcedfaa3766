import numpy as np
import pytest
import torch
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.models.tiny import tiny_sd15_pipeline
from lorafuse.train.cache import LatentCache, TextEncoderCache, encode_latents, module_fingerprint
from lorafuse.train.config import DatasetConfig
from lorafuse.train.data import SampleKey, TrainDataset, image_tensor
from lorafuse.train.scan import scan_dataset
from lorafuse.world.dataset import write_subject_dataset


@pytest.fixture(scope="module")
def pipes():
    return tiny_sd15_pipeline(seed=0), tiny_sd15_pipeline(seed=1)


@pytest.fixture
def index(tmp_path):
    write_subject_dataset("robot_09", tmp_path / "ds", n=3, repeats=2)
    return scan_dataset(
        DatasetConfig(train_data_dir=tmp_path / "ds", resolution=64, flip_aug=True, cache_latents=True)
    )


def test_disk_cache_reuses_and_matches_a_fresh_encoding(index, pipes):
    vae = pipes[0].vae
    cache = LatentCache(vae, to_disk=True)
    assert (cache.prepare(index).computed, cache.prepare(index).reused) == (3, 3)
    files = sorted(index.items[0].path.parent.glob("*.latents.safetensors"))
    assert [f.name for f in files] == [
        f"00{k}.png.latents.safetensors" for k in range(3)
    ]  # beside the images
    for flip in (False, True):
        expected = encode_latents(vae, image_tensor(index.items[1], flip, None)[0][None])[0]
        got = cache.get(1, flip)
        assert got.shape == (4, 8, 8) and torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(
        cache.get(1, False), cache.get(1, True)
    )  # the flipped entry is its own encoding


def test_cache_invalidates_when_the_image_changes(index, pipes):
    LatentCache(pipes[0].vae, to_disk=True).prepare(index)
    path = index.items[2].path
    pixels = np.asarray(Image.open(path)).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(path)
    cache = LatentCache(pipes[0].vae, to_disk=True)
    stats = cache.prepare(index)
    assert (stats.computed, stats.reused) == (1, 2)
    fresh = encode_latents(pipes[0].vae, image_tensor(index.items[2], False, None)[0][None])[0]
    assert torch.allclose(cache.get(2, False), fresh, atol=1e-5)


def test_cache_invalidates_when_the_vae_changes(index, pipes):
    vae0, vae1 = pipes[0].vae, pipes[1].vae
    assert module_fingerprint(vae0) != module_fingerprint(vae1)
    first = LatentCache(vae0, to_disk=True)
    first.prepare(index)
    old = first.get(0, False)
    second = LatentCache(vae1, to_disk=True)
    assert second.prepare(index).computed == 3
    assert not torch.allclose(old, second.get(0, False))  # really new latents, not the old file
    with pytest.raises(UserInputError, match="changed since prepare"):
        first.get(0, False)  # the first cache's file was rewritten: no silent wrong latents
    assert LatentCache(vae0, to_disk=True).prepare(index).computed == 3  # and back again


def test_resolution_change_and_corrupt_file_are_stale(tmp_path, index, pipes):
    vae = pipes[0].vae
    LatentCache(vae, to_disk=True).prepare(index)
    (index.items[0].path.with_name("000.png.latents.safetensors")).write_bytes(b"not a safetensors file")
    assert LatentCache(vae, to_disk=True).prepare(index).computed == 1
    bigger = scan_dataset(
        DatasetConfig(train_data_dir=index.config.train_data_dir, resolution=128, cache_latents=True)
    )
    cache = LatentCache(vae, to_disk=True)
    assert cache.prepare(bigger).computed == 3 and cache.get(0, False).shape == (4, 16, 16)


def test_memory_and_cache_dir_modes(tmp_path, index, pipes):
    vae = pipes[0].vae
    memory = LatentCache(vae)
    assert memory.prepare(index).computed == 3 and memory.prepare(index).reused == 3
    assert not list(index.items[0].path.parent.glob("*.safetensors"))
    in_dir = LatentCache(vae, to_disk=True, cache_dir=tmp_path / "cache")
    in_dir.prepare(index)
    assert len(list((tmp_path / "cache").glob("*.latents.safetensors"))) == 3
    assert torch.equal(in_dir.get(0, True), memory.get(0, True))
    item = TrainDataset(index, seed=0, latent_cache=memory)[SampleKey(0, 0)]
    assert "pixel_values" not in item and item["latents"].shape == (4, 8, 8)


def test_text_encoder_cache(index, pipes):
    pipe0, pipe1 = pipes
    cache = TextEncoderCache([pipe0.tokenizer], [pipe0.text_encoder], clip_skip=1, to_disk=True)
    assert cache.prepare(index).computed == 3
    assert TextEncoderCache([pipe0.tokenizer], [pipe0.text_encoder], to_disk=True).prepare(index).reused == 3
    out = cache.get(0)["encoder_hidden_states"]
    assert out.shape == (77, 32)
    skip2 = TextEncoderCache([pipe0.tokenizer], [pipe0.text_encoder], clip_skip=2, to_disk=True)
    assert skip2.prepare(index).computed == 3 and not torch.allclose(
        skip2.get(0)["encoder_hidden_states"], out
    )
    other = TextEncoderCache([pipe1.tokenizer], [pipe1.text_encoder], to_disk=True)
    assert other.prepare(index).computed == 3
    item = TrainDataset(index, seed=0, text_cache=other)[SampleKey(0, 0)]
    assert torch.equal(item["text"]["encoder_hidden_states"], other.get(0)["encoder_hidden_states"])
