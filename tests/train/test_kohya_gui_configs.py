"""examples/kohya/gui_*.toml: configs as the kohya_ss GUI's LoRA tab writes them (keys sorted, empty / false / 0
values left out, network_args split on spaces) for an SDXL LyCORIS LoKr, an SD1.5 LoCon with block LR weights and
block dims, and an SD1.5 LoRA continued from a file. Each imports with no refused key, passes `--dry-run`, and
trains a few steps on the tiny models unchanged but for paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafuse.cli.main import main
from lorafuse.config.toml_io import read_toml
from lorafuse.lora.io import load_lora, read_tensors, save_lora
from lorafuse.lora.keys import UnetLayout
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig
from lorafuse.train.kohya_import import convert_flat
from lorafuse.train.network import block_labels, block_of, create_network
from lorafuse.world.dataset import write_subject_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kohya"
BASES = {"gui_sdxl_lokr.toml": "sdxl-tiny", "gui_sd15_block_weights.toml": "sd15-tiny",
         "gui_sd15_continue.toml": "sd15-tiny"}  # fmt: skip
TINY = ["--resolution", "64", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--mixed_precision", "no",
        "--max_train_steps", "2", "--no-progress"]  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The examples' relative paths (data/..., out/...) resolve in tmp_path; out/seed002/geralt.safetensors is a
    tiny SD1.5 LoRA of rank 4 (the file gui_sd15_continue.toml continues)."""
    monkeypatch.chdir(tmp_path)
    for name in ("geralt", "zkz_style"):
        write_subject_dataset("robot_09", tmp_path / "data" / name, n=2, repeats=1)
    pipe = tiny_pipeline("sd15", seed=0)
    torch.manual_seed(0)
    network = create_network(pipe, NetworkConfig(network_dim=4, network_alpha=2), "sd15")
    (tmp_path / "out" / "seed002").mkdir(parents=True)
    save_lora(network.to_lora_state(), tmp_path / "out/seed002/geralt.safetensors", arch="sd15")
    return tmp_path


@pytest.mark.parametrize("name", sorted(BASES))
def test_gui_config_imports_and_dry_runs(name, workdir):
    pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install 'lorafuse[lycoris]')")
    imp = convert_flat(read_toml(EXAMPLES / name))
    assert not imp.refused, imp.table()
    assert main(["train", str(EXAMPLES / name), "--pretrained_model_name_or_path", BASES[name], "--dry-run"]) == 0


def test_gui_sdxl_lokr_trains(workdir):
    pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install 'lorafuse[lycoris]')")
    argv = ["train", str(EXAMPLES / "gui_sdxl_lokr.toml"), "--pretrained_model_name_or_path", "sdxl-tiny", *TINY]
    assert main(argv) == 0
    path = workdir / "out/sdxl_lokr/zkz_lokr.safetensors"
    tensors, meta = read_tensors(path)
    assert any(k.endswith("lokr_w1") for k in tensors) and all(k.startswith("lora_unet_") for k in tensors)
    assert '"preset": "full"' in meta["ss_network_args"] and '"factor": 8' in meta["ss_network_args"]
    assert load_lora(path, base=tiny_pipeline("sdxl")).modules


def test_gui_block_weights_train_with_kohyas_block_ranks(workdir):
    argv = ["train", str(EXAMPLES / "gui_sd15_block_weights.toml"), "--pretrained_model_name_or_path", "sd15-tiny",
            *TINY]  # fmt: skip
    assert main(argv) == 0
    unet = tiny_pipeline("sd15").unet
    labels, layout = block_labels(unet), UnetLayout.from_config(unet.config)
    flat = read_toml(EXAMPLES / "gui_sd15_block_weights.toml")
    args = dict(a.split("=") for a in flat["network_args"])
    dims = dict(zip(labels, map(int, args["block_dims"].split(",")), strict=True))
    state = load_lora(workdir / "out/sd15_blocks/blocks.safetensors", base=tiny_pipeline("sd15"))
    blocks = {}
    for key, module in state.modules.items():
        comp, _, path = key.partition(".")
        if comp == "unet" and module.down.dim() == 2:  # block_dims rank the Linear (and 1x1) layers
            blocks.setdefault(block_of(path, layout), set()).add(module.rank)
    # LR weight 0 (<= block_lr_zero_threshold 0.1): IN00-IN05 and OUT06-OUT11 get no LoRA, as in kohya
    assert not {b for b in blocks if b in labels[:6] or b in labels[-6:]}
    assert blocks["IN07"] == {8} and blocks["IN08"] == {16} and blocks["MID"] == {16} and blocks["OUT05"] == {8}
    for block, ranks in blocks.items():
        if block is not None:
            assert ranks == {dims[block]}, block


def test_gui_continue_trains_with_the_files_ranks(workdir):
    argv = ["train", str(EXAMPLES / "gui_sd15_continue.toml"), "--pretrained_model_name_or_path", "sd15-tiny",
            *TINY]  # fmt: skip
    assert main(argv) == 0
    state = load_lora(workdir / "out/geralt_more/geralt_more.safetensors", base=tiny_pipeline("sd15"))
    start = load_lora(workdir / "out/seed002/geralt.safetensors", base=tiny_pipeline("sd15"))
    assert state.modules.keys() == start.modules.keys()
    assert {m.rank for m in state.modules.values()} == {4}  # dim_from_weights: the file's 4, not network_dim 8


def test_the_guis_prompt_file_matters_only_when_sampling(tmp_path, monkeypatch):
    # the GUI always names <output_dir>/sample/prompt.txt; kohya opens it only to sample
    monkeypatch.chdir(tmp_path)
    flat = {"pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d", "sample_prompts": "out/prompt.txt"}
    imp = convert_flat(flat)
    assert not imp.refused and "sample_prompts" not in imp.data.get("training", {})
    (row,) = convert_flat({**flat, "sample_every_n_epochs": 1}).refused
    assert row.key == "sample_prompts" and "sample prompt file not found" in row.detail
