"""Broken LoRA files found by a second corpus: damaged safetensors headers, renamed archives, empty factors,
LyCORIS parts that do not multiply, float8 factors, swapped factors. Each is one error naming the file and the
problem (or a named warning), through every reading command, and before any base model loads."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import zipfile

import pytest
import torch

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def work(tmp_path, lora_files):
    shutil.copy(lora_files["sd15"], tmp_path / "good.safetensors")
    return tmp_path


def _parts(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header_text: str, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_text.encode())) + header_text.encode() + body


def _zip(raw: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("lora.safetensors", raw)
    return buf.getvalue()


RENAMED = {  # name -> (bytes from the good file's bytes, what the message must say)
    "gzip": (gzip.compress, "gzip archive; unpack it"),
    "zip": (_zip, "zip archive"),
    "pickle": (lambda raw: b"\x80\x04\x95" + raw[:64], "Python pickle"),
    "lfs": (lambda raw: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "git lfs pull"),
    "html": (lambda raw: b"<!DOCTYPE html><html>404</html>", "HTML/XML page"),
    "text": (lambda raw: b"just some text\n" * 4, "does not start like one"),
    "7bytes": (lambda raw: raw[:7], "only 7 bytes"),
    "cut_in_header": (lambda raw: raw[:200], "cut short"),
    "cut_in_data": (lambda raw: raw[: len(raw) - 100], "cut short"),
}


@pytest.mark.parametrize("kind", sorted(RENAMED))
def test_damaged_or_renamed_file_says_what_it_is(cli, work, kind):
    make, says = RENAMED[kind]
    path = work / f"{kind}.safetensors"
    path.write_bytes(make((work / "good.safetensors").read_bytes()))
    cli.refused(["inspect", path], str(path), "not a readable safetensors file", says, watch=work)


def test_header_naming_a_tensor_twice(cli, work):
    raw, n, header, body = _parts(work / "good.safetensors")
    first = next(k for k in header if k != "__metadata__")
    text = raw[8 : 8 + n].decode()
    doubled = "{" + json.dumps({first: header[first]})[1:-1] + "," + text[1:]
    path = work / "twice.safetensors"
    path.write_bytes(_with_header(doubled, body))
    cli.refused(["inspect", path], str(path), f"lists tensor {first!r} twice", watch=work)


def test_header_length_past_the_end(cli, work):
    raw, n, _, _ = _parts(work / "good.safetensors")
    path = work / "long.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    cli.refused(["inspect", path], str(path), "header length field says", "cut short", watch=work)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda h, k: h[k].update(dtype="F128"), "unknown variant `F128`"),  # dtype strings safetensors lacks
        (lambda h, k: h[k].update(shape=[h[k]["shape"][0] * 2, *h[k]["shape"][1:]]), "invalid shape"),
    ],
)
def test_inconsistent_header_is_named(cli, work, edit, says):
    _, _, header, body = _parts(work / "good.safetensors")
    key = next(k for k in header if k.endswith("lora_up.weight"))
    edit(header, key)
    path = work / "bad.safetensors"
    path.write_bytes(_with_header(json.dumps(header), body))
    cli.refused(["inspect", path], str(path), "its header is inconsistent", says, watch=work)


def _edit(h, work, name, change):
    tensors = h.kohya_tensors(work / "good.safetensors")
    change(tensors)
    return h.write_tensors(work / name, tensors)


def test_rank_zero_module(cli, h, work):
    def zero(t):
        t[f"{KEY}.lora_down.weight"] = torch.zeros(0, t[f"{KEY}.lora_down.weight"].shape[1])
        t[f"{KEY}.lora_up.weight"] = torch.zeros(t[f"{KEY}.lora_up.weight"].shape[0], 0)

    path = _edit(h, work, "rank0.safetensors", zero)
    for tool in (["inspect"], ["resize", "--rank", "1", "--out", work / "r.safetensors"]):
        cli.refused([tool[0], path, *tool[1:]], str(path), KEY, "empty factor", "rank >= 1", watch=work)


@pytest.mark.parametrize(
    ("parts", "says"),
    [
        ({"hada_w1_a": (8, 2), "hada_w1_b": (3, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}, "hada_w1_b (3, 8)"),
        ({"lora_down.weight": (2, 8, 1, 1), "lora_mid.weight": (3, 3, 3, 3), "lora_up.weight": (8, 2, 1, 1)},
         "lora_mid.weight (3, 3, 3, 3)"),  # fmt: skip
        ({"lokr_w1": (2, 2), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (0, 5), "lokr_w2_b": (2, 9)}, "empty factor"),
    ],
)
def test_lycoris_parts_that_do_not_fit_together(cli, h, work, parts, says):
    tensors = {f"{KEY}.{name}": torch.rand(shape) * 0.1 for name, shape in parts.items()}
    path = h.write_tensors(work / "lyco.safetensors", tensors)
    cli.refused(["inspect", path], str(path), KEY, says, watch=work)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_factors_are_read_exactly(cli, h, work, dtype):
    """float8 LoRAs (FLUX.1 fp8 exports) traced back from torch.isfinite; every float8 value is exact in float16."""
    from lorafuse.lora.io import load_lora

    tensors = h.kohya_tensors(work / "good.safetensors")
    path = h.write_tensors(work / "fp8.safetensors", {k: v.to(dtype) for k, v in tensors.items()})
    code, out, err = cli("inspect", path)
    assert code == 0 and "Traceback" not in err, err
    up = load_lora(path).modules[next(iter(load_lora(path).modules))].up
    assert up.dtype == torch.float16
    assert torch.equal(up.float(), tensors[f"{KEY}.lora_up.weight"].to(dtype).float())


def test_swapped_factors_warn_naming_the_module(cli, h, work):
    """On a square layer swapped factors still multiply (rank = the layer's width), to a 2x2 update."""
    square = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (320, 320)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 320, generator=g) * 0.05, torch.randn(320, 2, generator=g) * 0.05
    path = h.write_tensors(work / "swapped.safetensors", {f"{square}.lora_up.weight": down,
                                                          f"{square}.lora_down.weight": up})  # fmt: skip
    code, _, err = cli("inspect", path)
    assert code == 0 and "Traceback" not in err
    assert f"{square}: rank 320, layer 2x2" in err and "are lora_up and lora_down swapped?" in err


def test_blocked_pickle_global_is_one_line(cli, work):
    path = work / "evil.ckpt"
    path.write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    msg = cli.refused(["inspect", path, "--allow-pickle"], str(path), "unsupported GLOBAL os.system", watch=work)
    assert "weights_only` set to `False`" not in msg  # torch's advice to run the file's code is not repeated


@pytest.mark.parametrize("command", ["fuse", "bake", "inspect", "train"])
def test_broken_file_fails_before_the_base_loads(cli, work, monkeypatch, command):
    """A file-level problem shows before any base model is loaded, in every command that loads one."""
    import lorafuse.models.load as load

    def no_base(*args, **kwargs):
        raise AssertionError("the base loaded before the LoRA file was checked")

    monkeypatch.setattr(load, "tiny_base", no_base)  # what every command's base loading ends in for sd15-tiny
    path = work / "cut.safetensors"
    path.write_bytes((work / "good.safetensors").read_bytes()[:-100])
    argv = {
        "fuse": ["fuse", "--content", work / "good.safetensors", "--style", path, "--prompt", "a", "--method",
                 "direct", "--base", "sd15-tiny", "--out", work / "out"],
        "bake": ["bake", "--base", "sd15-tiny", "--lora", path, "--out", work / "out"],
        "inspect": ["inspect", path, "--base", "sd15-tiny"],
        "train": ["train", "--pretrained_model_name_or_path", "sd15-tiny", "--train_data_dir", work / "nowhere",
                  "--resolution", "64", "--output_dir", work / "out", "--network_weights", path, "--dry-run"],
    }[command]  # fmt: skip
    msg = cli.refused(argv, str(path), "cut short", watch=work)
    if command == "fuse":
        assert "direct: style LoRA: " in msg  # which of the two files


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (["conv_in.weight", "down_blocks.0.attentions.0.proj_in.bias"], "the weights of a whole model"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"],
         "a full Stable Diffusion checkpoint"),  # fmt: skip
    ],
)
def test_a_model_file_given_as_a_lora(cli, h, work, keys, says):
    path = h.write_tensors(work / "model.safetensors", {k: torch.ones(4, 4) for k in keys})
    cli.refused(["inspect", path], str(path), says, "not a LoRA", "--base", watch=work)
