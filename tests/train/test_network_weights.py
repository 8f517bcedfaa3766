"""network_weights / dim_from_weights: a LoRA file continues exactly where it stopped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lorafuse.cli.main import main
from lorafuse.errors import UserInputError
from lorafuse.lora.io import load_lora, read_tensors, save_lora
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig
from lorafuse.train.kohya_import import load_train_config_any
from lorafuse.train.network import create_network
from lorafuse.train.prepare import prepare
from lorafuse.world.dataset import write_subject_dataset


def _trained_file(tmp_path, net_cfg):
    pipe = tiny_pipeline("sd15", seed=0)
    torch.manual_seed(0)
    network = create_network(pipe, net_cfg, "sd15")
    with torch.no_grad():
        for p in network.named_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)  # B != 0: a LoRA that does something
    path = save_lora(
        network.to_lora_state(), tmp_path / "first.safetensors", arch="sd15", uniform_alpha=False
    )
    return path, load_lora(path, base=pipe)


def _deltas(network):
    return {k: m.delta_weight() for k, m in network.to_lora_state().modules.items()}


def test_continue_with_the_same_settings_and_another_alpha(tmp_path):
    path, saved = _trained_file(tmp_path, NetworkConfig(network_dim=4, network_alpha=2))
    expected = {k: m.delta_weight() for k, m in saved.modules.items()}
    for alpha in (2, 8):  # 8: lora_up is rescaled so ΔW stays the file's
        pipe = tiny_pipeline("sd15", seed=0)
        net = create_network(
            pipe, NetworkConfig(network_dim=4, network_alpha=alpha, network_weights=path), "sd15"
        )
        got = _deltas(net)
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)


def test_dim_from_weights_takes_the_files_ranks(tmp_path):
    path, saved = _trained_file(
        tmp_path, NetworkConfig(network_dim=3, network_alpha=1, network_train_unet_only=True)
    )
    pipe = tiny_pipeline("sd15", seed=0)
    net = create_network(
        pipe, NetworkConfig(network_dim=16, network_weights=path, dim_from_weights=True), "sd15"
    )
    assert set(net.plan) == {"unet"}  # the file's modules only, not the text encoder the settings ask for
    assert {r for comp in net.plan.values() for r, _ in comp.values()} == {3}
    got = _deltas(net)
    for k, m in saved.modules.items():
        torch.testing.assert_close(got[k], m.delta_weight(), rtol=1e-5, atol=1e-7)


def test_rank_mismatch_is_one_clear_error(tmp_path):
    path, _ = _trained_file(tmp_path, NetworkConfig(network_dim=4))
    with pytest.raises(UserInputError, match="has rank 4 but network_dim is 8"):
        create_network(
            tiny_pipeline("sd15", seed=0), NetworkConfig(network_dim=8, network_weights=path), "sd15"
        )


# --- checked before any model loads (dry run and real run) ----------------------------------------------------


def _file(tmp_path, arch: str, name: str, **net) -> Path:
    """A tiny trained LoRA of `arch` (B != 0) with kohya names and our metadata."""
    pipe = tiny_pipeline(arch, seed=0)
    torch.manual_seed(0)
    network = create_network(pipe, NetworkConfig(**net), arch)
    with torch.no_grad():
        for p in network.named_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    return save_lora(network.to_lora_state(), tmp_path / name, arch=arch, uniform_alpha=False)


def _dry_run(tmp_path, base: str, weights: Path, *flags: str) -> int:
    """`lorafuse train kohya.toml --dry-run` on a kohya flat config that continues from `weights`."""
    if not (tmp_path / "data").exists():
        write_subject_dataset("robot_09", tmp_path / "data", n=1, repeats=1)
    (tmp_path / "kohya.toml").write_text(
        f'pretrained_model_name_or_path = "{base}"\ntrain_data_dir = "{(tmp_path / "data").as_posix()}"\n'
        f'output_dir = "{(tmp_path / "out").as_posix()}"\nresolution = "64,64"\nnetwork_module = "networks.lora"\n'
        f'network_weights = "{weights.as_posix()}"\n'
    )
    return main(["train", str(tmp_path / "kohya.toml"), "--dry-run", *flags])


def _refused(capsys, *args) -> str:
    """The one error line of a dry run that must fail."""
    capsys.readouterr()
    assert _dry_run(*args) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def _real_run_refuses(tmp_path, monkeypatch, overrides: dict) -> str:
    """The same config as a real run: the error comes before the base model loads."""

    def refuse(*_, **__):
        raise AssertionError("the base model was loaded before the network_weights check")

    monkeypatch.setattr("lorafuse.train.prepare.load_base_pipeline", refuse)
    cfg = load_train_config_any(tmp_path / "kohya.toml", overrides)[0]
    with pytest.raises(UserInputError) as e:
        prepare(cfg, progress_bar=False)
    return str(e.value)


def test_a_matching_file_passes_the_dry_run(tmp_path):
    path = _file(tmp_path, "sd15", "ok.safetensors", network_dim=4, conv_dim=2)
    assert _dry_run(tmp_path, "sd15-tiny", path, "--network_dim", "4", "--network_args", "conv_dim=2") == 0


def test_an_sdxl_file_on_an_sd15_base_is_refused_by_family(tmp_path, capsys, monkeypatch):
    path = _file(tmp_path, "sdxl", "xl.safetensors", network_dim=4)
    error = _refused(capsys, tmp_path, "sd15-tiny", path, "--network_dim", "4")
    assert re.search(
        r"xl\.safetensors: network_weights is a LoRA for SDXL \(metadata .*\), but the base is SD1\.5", error
    )
    assert "LoRA for SDXL" in _real_run_refuses(tmp_path, monkeypatch, {"network.network_dim": 4})


def test_an_sd15_file_on_a_flux_base_is_refused_by_family(tmp_path, capsys):
    path = _file(tmp_path, "sd15", "sd.safetensors", network_dim=4)
    error = _refused(capsys, tmp_path, "flux-tiny", path)
    assert re.search(r"sd\.safetensors: network_weights is a LoRA for SD1\.5 .*, but the base is FLUX", error)


def test_wrong_rank_names_module_and_setting(tmp_path, capsys, monkeypatch):
    path = _file(tmp_path, "sd15", "r8.safetensors", network_dim=8)
    error = _refused(capsys, tmp_path, "sd15-tiny", path, "--network_dim", "4")
    assert re.search(
        r"r8\.safetensors: \d+ of \d+ modules .*module lora_\w+ has rank 8 but network_dim is 4", error
    )
    assert "dim_from_weights" in error
    assert _dry_run(tmp_path, "sd15-tiny", path, "--network_dim", "4", "--dim_from_weights") == 0
    error = _real_run_refuses(tmp_path, monkeypatch, {"network.network_dim": 4})
    assert "has rank 8 but network_dim is 4" in error


def test_locon_file_needs_conv_dim_and_its_rank(tmp_path, capsys):
    path = _file(tmp_path, "sd15", "locon.safetensors", network_dim=4, conv_dim=2)
    error = _refused(capsys, tmp_path, "sd15-tiny", path, "--network_dim", "4")
    assert "a 3x3 conv (LoCon) and conv_dim is not set" in error
    error = _refused(
        capsys, tmp_path, "sd15-tiny", path, "--network_dim", "4", "--network_args", "conv_dim=3"
    )
    assert "has rank 2 but conv_dim is 3" in error


def test_text_encoder_modules_with_unet_only(tmp_path, capsys):
    path = _file(tmp_path, "sd15", "te.safetensors", network_dim=4)
    error = _refused(capsys, tmp_path, "sd15-tiny", path, "--network_dim", "4", "--network_train_unet_only")
    assert "trains the text encoder, the config does not (network_train_unet_only)" in error


def _lycoris_cfg(algo: str, preset: str = "full", **extra) -> NetworkConfig:
    net = dict(network_module="lycoris.kohya", algo=algo, network_dim=4, network_alpha=2, conv_dim=4)
    return NetworkConfig(**{**net, "lycoris_preset": preset, **extra})


def _lycoris_file(tmp_path, algo: str, preset: str = "full", arch: str = "sd15") -> Path:
    pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install 'lorafuse[lycoris]')")
    pipe = tiny_pipeline(arch, seed=0)
    torch.manual_seed(0)
    cfg = _lycoris_cfg(algo, preset)
    network = create_network(pipe, cfg, arch)
    with torch.no_grad():
        for p in network.named_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    return network.save(tmp_path / f"{algo}_{arch}.safetensors", arch=arch, base=pipe, training={}, metadata={},
                        dtype=torch.float32)  # fmt: skip


def test_a_lycoris_loha_file_is_refused_before_the_model_loads(tmp_path, capsys):
    path = _lycoris_file(tmp_path, "loha")
    error = _refused(capsys, tmp_path, "sd15-tiny", path, "--network_dim", "4")
    assert re.search(r"loha_sd15\.safetensors: network_weights holds \d+ LyCORIS LoHa/LoKr modules", error)


def test_a_lycoris_locon_file_continues_exactly(tmp_path, capsys):
    # LyCORIS's full preset also trains conv_in, conv_out and the time embedding, which networks.lora does not
    error = _refused(capsys, tmp_path, "sd15-tiny", _lycoris_file(tmp_path, "locon"), "--network_dim", "4",
                     "--network_args", "conv_dim=4")  # fmt: skip
    assert re.search(r"lora_unet_(conv_in|conv_out|time_embedding_linear_\d) is not among the modules", error)
    # a preset of kohya's own LoCon module set continues exactly
    preset = tmp_path / "kohya_locon.toml"
    preset.write_text(
        'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'
        'unet_target_name = []\ntext_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
    )
    path = _lycoris_file(tmp_path, "locon", str(preset))
    assert _dry_run(tmp_path, "sd15-tiny", path, "--network_dim", "4", "--network_args", "conv_dim=4") == 0
    pipe = tiny_pipeline("sd15", seed=0)
    cfg = NetworkConfig(network_dim=4, conv_dim=4, network_weights=path)
    got = _deltas(create_network(pipe, cfg, "sd15"))
    saved = load_lora(path, base=pipe)
    assert got.keys() >= saved.modules.keys()
    for k, m in saved.modules.items():
        torch.testing.assert_close(got[k], m.delta_weight(), rtol=1e-5, atol=1e-7)


# --- network_module = lycoris.kohya continues from a LyCORIS file ------------------------------------------------


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_lycoris_continues_exactly_where_its_file_stopped(algo, tmp_path):
    path = _lycoris_file(tmp_path, algo)
    pipe = tiny_pipeline("sd15", seed=0)
    torch.manual_seed(1)  # another initialisation than the file's: every tensor must come from the file
    network = create_network(pipe, _lycoris_cfg(algo, network_weights=path), "sd15")
    ours, (theirs, _) = network.kohya_tensors("sd15", pipe), read_tensors(path)
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=0, msg=key)


def test_lycoris_file_of_another_algo_or_rank_is_refused(tmp_path):
    path = _lycoris_file(tmp_path, "loha")
    with pytest.raises(
        UserInputError,
        match=r"loha_sd15\.safetensors: (\d+) of \1 modules .* holds alpha, hada_w1_a.*\(lokr\)",
    ):
        create_network(tiny_pipeline("sd15", seed=0), _lycoris_cfg("lokr", network_weights=path), "sd15")
    with pytest.raises(
        UserInputError,
        match=r"(\d+) of \1 modules .*hada_w1_a has shape \(64, 4\), the network \(64, 8\); set network_dim",
    ):
        cfg = _lycoris_cfg("loha", network_dim=8, conv_dim=8, network_weights=path)
        create_network(tiny_pipeline("sd15", seed=0), cfg, "sd15")


def test_lycoris_file_of_another_family_fails_the_dry_run(tmp_path, capsys):
    path = _lycoris_file(tmp_path, "lokr", arch="sdxl")
    error = _refused(capsys, tmp_path, "sd15-tiny", path, "--network_module", "lycoris.kohya",
                     "--network_args", "algo=lokr")  # fmt: skip
    assert re.search(
        r"lokr_sdxl\.safetensors: network_weights is a LoRA for SDXL .*the base is SD1\.5", error
    )


@pytest.mark.parametrize(("algo", "arch"), [("lokr", "sd15"), ("loha", "sdxl")])
def test_lycoris_dim_from_weights_builds_the_files_modules(algo, arch, tmp_path):
    path = _lycoris_file(tmp_path, algo, arch=arch)  # dims 4, conv 4, alpha 2
    pipe = tiny_pipeline(arch, seed=0)
    cfg = _lycoris_cfg(algo, network_dim=16, conv_dim=8, network_weights=path, dim_from_weights=True)
    network = create_network(pipe, cfg, arch)
    ours, (theirs, _) = network.kohya_tensors(arch, pipe), read_tensors(path)
    assert ours.keys() == theirs.keys()  # SDXL: the file's SGM names found their diffusers modules
    for key, tensor in theirs.items():
        if not key.endswith(
            ".alpha"
        ):  # LyCORIS rebuilds full-matrix LoKr modules with alpha 1 (unused there)
            torch.testing.assert_close(ours[key], tensor, rtol=0, atol=0, msg=key)
    again = network.save(tmp_path / "again.safetensors", arch=arch, base=pipe, training={}, metadata={},
                         dtype=torch.float32)  # fmt: skip
    before, after = load_lora(path, base=pipe), load_lora(again, base=pipe)
    for key, module in before.modules.items():
        torch.testing.assert_close(after.modules[key].delta_weight(), module.delta_weight(), msg=key)
    assert all(p.requires_grad for p in network.named_parameters().values())
    with pytest.raises(UserInputError, match=r"holds LyCORIS .* modules, network_args algo = locon"):
        create_network(
            tiny_pipeline(arch, seed=0),
            _lycoris_cfg("locon", network_weights=path, dim_from_weights=True),
            arch,
        )
