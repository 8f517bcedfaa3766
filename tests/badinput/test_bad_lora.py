"""Bad LoRA files through the CLI: each is one clear error naming the file (and key), or a named warning."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def work(tmp_path, lora_files):
    """A folder with a copy of the good SD1.5 file; tests break copies of it there."""
    shutil.copy(lora_files["sd15"], tmp_path / "good.safetensors")
    return tmp_path


def _edit(h, work, name, change):
    tensors = h.kohya_tensors(work / "good.safetensors")
    change(tensors)
    return h.write_tensors(work / name, tensors)


def test_good_file_is_accepted(cli, work):
    code, out, err = cli("inspect", work / "good.safetensors")
    assert code == 0 and "format: kohya" in out and "warning" not in err


@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.int32, "int32"), (torch.int8, "int8"), (torch.bool, "bool"), (torch.int64, "int64")]
)
def test_integer_dtype_is_refused(cli, h, work, dtype, name):
    def to_int(t):
        t[f"{KEY}.lora_up.weight"] = (t[f"{KEY}.lora_up.weight"] * 100).to(dtype)

    path = _edit(h, work, "int.safetensors", to_int)
    cli.refused(["inspect", path], str(path), f"{KEY}.lora_up.weight", f"dtype {name}", "floating point", watch=work)


def test_vector_alpha_is_refused(cli, h, work):
    path = _edit(h, work, "vec.safetensors", lambda t: t.update({f"{KEY}.alpha": torch.tensor([1.0, 2.0])}))
    cli.refused(["inspect", path], str(path), f"{KEY}.alpha", "holds 2 values", "one number per module", watch=work)


@pytest.mark.parametrize(("value", "problem"), [(float("inf"), "inf"), (float("nan"), "nan"), (-4.0, "negative")])
def test_bad_alpha_value_is_refused(cli, h, work, value, problem):
    path = _edit(h, work, "a.safetensors", lambda t: t.update({f"{KEY}.alpha": torch.tensor(value)}))
    cli.refused(["inspect", path], str(path), f"{KEY}.alpha", problem, watch=work)


def test_absurd_alpha_is_refused(cli, h, work):
    """One module's alpha of 1e30 used to give an all-black image with exit 0."""
    path = _edit(h, work, "huge.safetensors", lambda t: t.update({f"{KEY}.alpha": torch.tensor(1e30)}))
    cli.refused(["inspect", path], str(path), KEY, "absurd update", "RMS", watch=work)
    cli.refused(["merge", path, work / "good.safetensors", "--out", work / "m.safetensors"], str(path), watch=work)


def test_zero_alpha_warns_and_reads_as_rank(cli, h, work):
    path = _edit(h, work, "zero.safetensors", lambda t: t.update({f"{KEY}.alpha": torch.tensor(0.0)}))
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert f"{path}: alpha is 0 in 1 module(s) ({KEY}.alpha); read as alpha = rank" in err
    assert "warning:" in err and "Traceback" not in err


def test_alpha_missing_in_one_module_warns_naming_it(cli, h, work):
    path = _edit(h, work, "miss.safetensors", lambda t: t.pop(f"{KEY}.alpha"))
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert f"{path}: 1 of 4 modules have no alpha while the others do ({KEY})" in err


def test_no_alpha_at_all_is_kohya_convention_and_silent(cli, h, work):
    def drop(t):
        for k in [k for k in t if k.endswith(".alpha")]:
            del t[k]

    path = _edit(h, work, "none.safetensors", drop)
    code, out, err = cli("inspect", path)
    assert code == 0 and "warning" not in err, err


def test_non_finite_factor_is_refused(cli, h, work):
    def poison(t):
        t[f"{KEY}.lora_down.weight"][0, 0] = float("nan")

    path = _edit(h, work, "nan.safetensors", poison)
    cli.refused(["inspect", path], str(path), f"{KEY}.lora_down.weight", "non-finite", watch=work)


def test_folder_passed_as_lora(cli, work):
    (work / "dir.safetensors").mkdir()
    cli.refused(["inspect", work / "dir.safetensors"], f"{work / 'dir.safetensors'}: is a folder, not a LoRA file")


def test_missing_file(cli, work):
    cli.refused(["inspect", work / "nope.safetensors"], "nope.safetensors: LoRA file not found", watch=work)


def test_dangling_symlink_as_lora(cli, work):
    (work / "link.safetensors").symlink_to(work / "gone.safetensors")
    cli.refused(["inspect", work / "link.safetensors"], "link.safetensors", "symbolic link", "does not exist")


def test_unreadable_file_says_permission_denied(cli, work, monkeypatch):
    """As root chmod 000 does not stop reads, so the open() that the check makes is made to fail as it would."""
    path = work / "good.safetensors"
    real_open = open

    def no_read(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("lorafuse.utils.inputs.open", no_read, raising=False)
    msg = cli.refused(["inspect", path], str(path), "permission denied", watch=work)
    assert "not found" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_by_mode(cli, work):
    path = work / "good.safetensors"
    path.chmod(0)
    cli.refused(["inspect", path], str(path), "permission denied")


def test_two_naming_schemes_in_one_file(cli, h, work):
    def both(t):
        down, up = t[f"{KEY}.lora_down.weight"], t[f"{KEY}.lora_up.weight"]
        module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        t[f"{module}.lora_A.weight"], t[f"{module}.lora_B.weight"] = down.clone(), up.clone()

    path = _edit(h, work, "both.safetensors", both)
    msg = cli.refused(["inspect", path], str(path), "mixes two LoRA naming schemes", "kohya", "PEFT", watch=work)
    assert "in no LoRA format" not in msg


def test_garbage_file(cli, work):
    (work / "junk.safetensors").write_bytes(os.urandom(300))
    cli.refused(["inspect", work / "junk.safetensors"], "junk.safetensors", "not a readable safetensors file")


def test_empty_file(cli, work):
    (work / "empty.safetensors").write_bytes(b"")
    cli.refused(["inspect", work / "empty.safetensors"], "empty.safetensors", "not a readable safetensors")


def test_relative_size_against_a_real_base(tmp_path):
    """With a base at hand the update is measured against the weight it changes: warning, then error."""
    from lorafuse.errors import LoraFormatError
    from lorafuse.lora.checks import LoraValueWarning
    from lorafuse.lora.state import LoraModule, LoraState
    from lorafuse.lora.validate import validate_lora
    from lorafuse.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd15", seed=0)
    key = next(k for k in sorted(_keys(pipe)) if k.endswith("attn2.to_k"))
    weight = pipe.unet.get_submodule(key.removeprefix("unet.")).weight.detach()
    norm = float(weight.norm())
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    unit = LoraModule(down=vh[:1].contiguous(), up=u[:, :1].contiguous(), alpha=1.0)  # ‖ΔW‖ = 1

    def state(ratio):
        return LoraState({key: LoraModule(unit.down, unit.up * ratio * norm, 1.0)}, source_path="x.safetensors")

    with pytest.warns(LoraValueWarning, match=r"x.safetensors: 1 module update\(s\) are more than 10 times"):
        validate_lora(state(20.0), pipe, arch="sd15")
    with pytest.raises(LoraFormatError, match=r"x.safetensors: module .*attn2.to_k: its update is 200 times"):
        validate_lora(state(200.0), pipe, arch="sd15")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_lora(state(0.5), pipe, arch="sd15")


def _keys(pipe):
    from lorafuse.lora.targets import base_modules

    return base_modules(pipe).modules
