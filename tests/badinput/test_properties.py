"""Property-based tests: whatever bytes, names, shapes, prompts or TOML come in, the parsers answer with a result
or a `UserInputError`, never another exception (a traceback in front of a user)."""

from __future__ import annotations

import json
import math
import string
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafuse.errors import UserInputError
from lorafuse.lora.state import LoraState

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- safetensors / LoRA key parser ---------------------------------------------------------------------------

MODULES = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
    "model.diffusion_model.input_blocks.0.0",
    "lycoris_unet_mid_block_resnets_0_conv1",
]
PARTS = ["lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a",
         "hada_w2_b", "lokr_w1", "lokr_w2", "lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight",
         "to_q_lora.down.weight", "to_k_lora.up.weight", "dora_scale", "diff", "weight", ""]  # fmt: skip
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8, torch.bool, torch.float64]

key_names = st.one_of(
    st.builds(lambda m, p: f"{m}.{p}" if p else m, st.sampled_from(MODULES), st.sampled_from(PARTS)),
    st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=40),
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
values = st.sampled_from([0.0, 1.0, -1.0, 1e30, float("nan"), float("inf"), 1e-30, 4.0])


@st.composite
def tensor_dicts(draw):
    out = {}
    for _ in range(draw(st.integers(0, 8))):
        shape = draw(shapes)
        dtype = draw(st.sampled_from(DTYPES))
        t = torch.full(shape, draw(values)) if dtype.is_floating_point else torch.ones(shape)
        out[draw(key_names)] = t.to(dtype)
    return out


metadata = st.dictionaries(
    st.sampled_from(["ss_network_module", "lora_adapter_metadata", "modelspec.architecture", "ss_base_model_version",
                     "format", "x"]),  # fmt: skip
    st.one_of(st.text(max_size=30), st.sampled_from(['{"unet.r": 4}', '{"unet.alpha_pattern": {"(": 1}}', "[1,2]",
                                                     "lycoris.kohya", '{"r": "a"}'])),  # fmt: skip
    max_size=3,
)


def _load(path):
    from lorafuse.lora.io import load_lora

    try:
        state = load_lora(path)
    except UserInputError:
        return None
    assert isinstance(state, LoraState)
    return state


@FAST
@given(tensors=tensor_dicts(), meta=metadata)
def test_lora_loader_never_crashes_on_tensors(tmp_path_factory, tensors, meta):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("p") / "x.safetensors"
    try:
        save_file(tensors, str(path), metadata=meta)
    except Exception:  # safetensors itself refuses some inputs (e.g. shared storage); nothing to load then
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load(path)


@st.composite
def raw_headers(draw):
    """A safetensors byte string with a random (often inconsistent) JSON header and a random payload."""
    entries = {}
    for _ in range(draw(st.integers(0, 4))):
        entries[draw(key_names)] = {
            "dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "BOOL", "F64", "XX", 3])),
            "shape": draw(st.lists(st.integers(-1, 6), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(-2, 64), min_size=0, max_size=3)),
        }
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.just({"a": "b"}), st.just({"a": 1}), st.just([])))
    header = json.dumps(entries).encode()
    if draw(st.booleans()):
        header = header[: draw(st.integers(0, len(header)))]
    size = len(header) + draw(st.integers(-5, 5)) if draw(st.booleans()) else len(header)
    return struct.pack("<Q", max(size, 0)) + header + draw(st.binary(max_size=64))


@FAST
@given(data=raw_headers())
def test_lora_loader_never_crashes_on_raw_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "x.safetensors"
    path.write_bytes(data)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load(path)


KINDS = {  # the parts one module of each kind may have; a drawn module gets a random subset, random shapes
    "kohya": ["lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"],
    "loha": ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"],
    "lokr": ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"],
}
FACTOR_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@st.composite
def one_module(draw):
    """One module whose parts all exist by name but whose shapes (0 included), ranks and dtypes are random: the
    class of files where only the factors' sizes are wrong (rank mismatch, rank 0, LyCORIS parts that do not
    multiply, float8 factors)."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    parts = draw(st.lists(st.sampled_from(KINDS[kind]), min_size=1, max_size=len(KINDS[kind]), unique=True))
    dims = st.integers(0, 4)
    out = {}
    for part in parts:
        if part == "alpha":
            out[f"{MODULES[0]}.alpha"] = torch.tensor(draw(st.sampled_from([0.0, 1.0, 2.0, 1e3])))
            continue
        shape = tuple(draw(st.lists(dims, min_size=2, max_size=4)))
        out[f"{MODULES[0]}.{part}"] = (torch.rand(shape) * 0.1).to(draw(st.sampled_from(FACTOR_DTYPES)))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=one_module())
def test_lora_loader_never_crashes_on_factor_shapes(tmp_path_factory, tensors):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("m") / "x.safetensors"
    save_file(tensors, str(path))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load(path)


@FAST
@given(names=st.lists(key_names, min_size=1, max_size=4), twice=st.integers(0, 3))
def test_a_header_naming_a_tensor_twice_is_refused(tmp_path_factory, names, twice):
    """JSON keeps the last of two equal keys without a word; the loader must not."""
    import warnings

    entries = [f'"{n}": {{"dtype": "F32", "shape": [1], "data_offsets": [{4 * i}, {4 * i + 4}]}}'
               for i, n in enumerate(names)]  # fmt: skip
    entries.append(entries[twice % len(entries)].replace(f"[{4 * (twice % len(entries))}, ", f"[{4 * len(names)}, ")
                   .replace(f"{4 * (twice % len(entries)) + 4}]", f"{4 * len(names) + 4}]"))  # fmt: skip
    header = ("{" + ", ".join(entries) + "}").encode()
    path = tmp_path_factory.mktemp("d") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * (len(names) + 1)))
    from lorafuse.lora.io import load_lora

    with warnings.catch_warnings(), pytest.raises(UserInputError, match="twice"):
        warnings.simplefilter("ignore")
        load_lora(path)


@FAST
@given(keys=st.lists(key_names, min_size=1, max_size=6, unique=True))
def test_format_detector_never_crashes(keys):
    from lorafuse.lora.formats import detect_format

    try:
        assert detect_format(keys, "x") in ("kohya", "diffusers")
    except UserInputError:
        pass


# --- marker parser ------------------------------------------------------------------------------------------

prompt_pieces = st.sampled_from(
    ["a", "sks", "teapot", " ", ",", "<c>", "<s>", "<c", "c>", "<C>", "</s>", "< c >", "<x>", "<lora:a:1>",
     "<cat-toy>", "[c]", "{s}", "(c)", "<", ">", "\n", "style", "<<c>>", "é", "<s/>", "c", "s", "(", ")", "/",
     "<c1>", "‹", "›", "&lt;", "&gt;", "[", "]", ":", "dog(s)", "<content>"]  # fmt: skip
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(prompt_pieces, max_size=12))
def test_marker_parser_answers_or_refuses(pieces):
    from lorafuse.fusion.markers import parse_prompt

    prompt = "".join(pieces)
    try:
        parsed = parse_prompt(prompt)
    except UserInputError as e:
        assert repr(prompt) in str(e)
        return
    # a parse is consistent: no marker text survives in the clean prompt, spans are non-empty
    assert "<c>" not in parsed.clean and "<s>" not in parsed.clean
    for span in (parsed.content_span, parsed.style_span):
        assert span is None or span.strip()
    assert set(parsed.order) <= {"c", "s"} and len(set(parsed.order)) == len(parsed.order)
    # and nothing marker-like reaches the text encoder: the clean prompt parses as itself, with no markers
    again = parse_prompt(parsed.clean)
    assert again.clean == parsed.clean and again.order == ()


# characters drawn like "<", ">", "c" or "s" in other scripts and blocks: each makes a marker a look-alike
LOOKALIKE = {"<": "‹＜〈《❮˂≤⟨«﹤", ">": "›＞〉》❯˃≥⟩»﹥", "c": "сϲᴄｃćçⅽ", "s": "ѕꜱｓśšş"}


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.sampled_from(["a", "sks", "teapot", "in", "ink", "style", "dog(s)", ","]), min_size=2,
                      max_size=6),
       marker=st.sampled_from(["<c>", "<s>"]), where=st.integers(0, 2), data=st.data())  # fmt: skip
def test_a_marker_with_one_lookalike_character_is_refused(words, marker, where, data):
    """Every marker spelled with one character swapped for a look-alike (`<с>` with a Cyrillic es, `《s》`, `˂c˃`)
    is an error, never a span silently lost."""
    from lorafuse.fusion.markers import parse_prompt

    ch = marker[where]
    fake = marker[:where] + data.draw(st.sampled_from(LOOKALIKE[ch if ch in "<>" else marker[1]])) + marker[where + 1 :]
    other = "<s>" if marker == "<c>" else "<c>"
    prompt = f"{' '.join(words)} {fake} more words {other}"
    with pytest.raises(UserInputError, match="looks like a marker"):
        parse_prompt(prompt)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_marker_parser_on_any_text(text):
    from lorafuse.fusion.markers import parse_prompt

    try:
        parse_prompt(text)
    except UserInputError:
        pass


# --- TOML config loader -------------------------------------------------------------------------------------

toml_scalars = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.integers(-(2**80), 2**80).map(str),  # beyond 64 bits, which TOML forbids and tomllib still returns
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: "nan" if math.isnan(f) else repr(f).replace("inf", "inf")),
    st.sampled_from(["true", "false", '"a"', '"8"', "[1, 2]", '["attn"]', "{}", "1979-05-27", "inf", "-inf", "nan"]),
)
train_keys = st.sampled_from(
    ["network_dim", "network_alpha", "learning_rate", "resolution", "seed", "max_train_steps", "layers", "typo",
     "min_snr_gamma", "train_batch_size", "output_name", "lr_warmup_steps"]  # fmt: skip
)
tables = st.sampled_from(["network", "optimizer", "dataset", "training", "loss", "scheduler", "model", "nope"])


@st.composite
def toml_texts(draw):
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"[{draw(tables)}]")
        for _ in range(draw(st.integers(0, 3))):
            lines.append(f"{draw(train_keys)} = {draw(toml_scalars)}")
    text = "\n".join(lines)
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # cut anywhere: broken TOML
    return text


@FAST
@given(text=toml_texts(), raw=st.binary(max_size=20))
def test_config_loader_answers_or_refuses(tmp_path_factory, text, raw):
    from lorafuse.train.config import load_train_config

    folder = tmp_path_factory.mktemp("c")
    path = folder / "run.toml"
    path.write_text(text)
    for candidate in (path, folder / "raw.toml"):
        (folder / "raw.toml").write_bytes(raw)
        try:
            load_train_config(candidate, {})
        except UserInputError:
            pass


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "+inf"])
def test_every_float_field_refuses_non_finite(value):
    """Not sampled: every float field of every training table, checked by name."""
    import dataclasses
    import types
    import typing

    from lorafuse.config.toml_io import config_from_dict
    from lorafuse.errors import ConfigError
    from lorafuse.train.config import TrainConfig

    checked = 0
    for table in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[table.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if tp is not float and not (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
                continue
            checked += 1
            data = {"model": {"pretrained_model_name_or_path": "world"}, "dataset": {"train_data_dir": "d"}}
            data.setdefault(table.name, {})[f.name] = float(value)
            with pytest.raises(ConfigError, match=rf"{table.name}\.{f.name}: must be a finite number"):
                config_from_dict(TrainConfig, data, "x.toml")
    assert checked >= 10  # learning rates, alphas, loss weights, rates...
    inside = {"model": {"pretrained_model_name_or_path": "w"}, "dataset": {"train_data_dir": "d"},
              "optimizer": {"betas": [float(value), 0.999]}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer\.betas: must be a finite number"):
        config_from_dict(TrainConfig, inside, "x.toml")
