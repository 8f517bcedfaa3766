"""examples/kohya/: the kohya_ss GUI configs train with `lorafuse train` unchanged but for paths, on the
tiny SD1.5 / SDXL / FLUX.1 models (and, to stay fast, a few steps at 64 px)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from lorafuse.cli.main import main
from lorafuse.lora.io import load_lora
from lorafuse.lora.validate import validate_lora
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.world.dataset import write_subject_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kohya"
TINY = ["--resolution", "64", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--sample_steps", "2",
        "--no-progress"]  # fmt: skip


def _dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118


def test_sd15_character_example(tmp_path, monkeypatch):
    write_subject_dataset("robot_09", tmp_path / "data", n=3, repeats=3)
    monkeypatch.chdir(tmp_path)  # the example's relative paths (prompt file) resolve here
    (tmp_path / "examples" / "kohya").mkdir(parents=True)
    shutil.copy(EXAMPLES / "sd15_prompts.txt", tmp_path / "examples" / "kohya")
    argv = ["train", str(EXAMPLES / "sd15_character_lora.toml"), "--pretrained_model_name_or_path", "sd15-tiny",
            "--train_data_dir", "data", "--output_dir", "out", "--max_train_steps", "5", *TINY]  # fmt: skip
    assert main(argv) == 0
    lora = tmp_path / "out" / "geralt.safetensors"
    assert _dtypes(lora) == {torch.float16}  # save_precision = "fp16"
    assert (tmp_path / "out" / "geralt-state").is_dir()  # save_state
    assert list(
        (tmp_path / "out" / "samples").glob("*.png")
    )  # sample_every_n_epochs = 1, prompts from the file
    pipe = tiny_pipeline("sd15")
    assert not validate_lora(load_lora(lora, base=pipe), pipe, arch="sd15").warnings


def test_sdxl_style_example_with_dataset_config(tmp_path):
    write_subject_dataset("robot_09", tmp_path / "data", n=2, repeats=1)
    (src,) = (tmp_path / "data").glob("1_*")
    for name in ("paintings", "sketches"):
        shutil.copytree(src, tmp_path / "zkz" / name)
    text = (
        (EXAMPLES / "sdxl_style_dataset.toml")
        .read_text()
        .replace("data/zkz_style", (tmp_path / "zkz").as_posix())
    )
    (tmp_path / "ds.toml").write_text(text)
    argv = ["train", str(EXAMPLES / "sdxl_style_lora.toml"), "--pretrained_model_name_or_path", "sdxl-tiny",
            "--dataset_config", str(tmp_path / "ds.toml"), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "2", *TINY]  # fmt: skip
    assert main(argv) == 0
    lora = tmp_path / "out" / "zkz_style.safetensors"
    assert _dtypes(lora) == {torch.bfloat16}  # save_precision = "bf16"
    state = load_lora(lora, base=(pipe := tiny_pipeline("sdxl")))
    assert all(k.startswith("unet") for k in state.modules)  # network_train_unet_only
    assert any(m.down.dim() == 4 and m.down.shape[-1] == 3 for m in state.modules.values())  # LoCon conv_dim
    assert not validate_lora(state, pipe, arch="sdxl").warnings


def test_flux_example(tmp_path, tiny_flux):
    """kohya's FLUX guide settings train flux-tiny, given as kohya's four separate files (BFL transformer, ae,
    clip_l, t5xxl), unchanged but for paths; lora_flux's block indices pick the blocks (single blocks 0-1 of the
    tiny model's 4)."""
    from tests.flux_disk import write_parts

    files = write_parts(tiny_flux(), tmp_path / "models")
    write_subject_dataset("robot_09", tmp_path / "data", n=2, repeats=1)
    paths = [f"--{k}={v}" for k, v in files.items()]  # the four files, and --tokenizers: a folder of flux-tiny's
    argv = ["train", str(EXAMPLES / "flux_lora.toml"), *paths,
            "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "2", "--max_train_epochs", "none", "--mixed_precision", "no",
            "--optimizer_type", "AdamW", *TINY]  # fmt: skip
    assert main(argv) == 0
    lora = tmp_path / "out" / "flux_subject.safetensors"
    assert _dtypes(lora) == {torch.bfloat16}  # save_precision = "bf16"
    state = load_lora(lora)
    blocks = {".".join(k.split(".")[1:3]) for k in state.modules}
    assert blocks == {"transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                      "single_transformer_blocks.1"}  # fmt: skip
    assert state.metadata["ss_timestep_sampling"] == "shift" and state.metadata["ss_discrete_flow_shift"] == "3.1582"
