"""A few refusals through a real `python -m lorafuse` process: stderr holds lorafuse's one line and nothing else
(no transformers / torchvision / bitsandbytes chatter before it, no traceback), and the exit status is 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafuse", *map(str, argv)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_loras(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from lorafuse.lora.io import save_lora
    from lorafuse.lora.state import LoraModule, LoraState
    from lorafuse.lora.targets import base_modules
    from lorafuse.models.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny")
    pipe = tiny_pipeline("sd15", seed=0)
    mods = base_modules(pipe).modules
    keys = [k for k in sorted(mods) if k.endswith("attn2.to_k")][:2]
    g = torch.Generator().manual_seed(0)
    state = LoraState({k: LoraModule(down=torch.randn(2, mods[k].shape[1], generator=g) * 0.1,
                                     up=torch.randn(mods[k].shape[0], 2, generator=g) * 0.1, alpha=1.0)
                       for k in keys})  # fmt: skip
    good = save_lora(state, folder / "good.safetensors", arch="sd15", base=pipe)
    tensors = load_file(str(good))
    alpha = next(k for k in sorted(tensors) if k.endswith(".alpha"))
    tensors[alpha] = torch.tensor(1e12)
    save_file(tensors, str(folder / "bad.safetensors"))
    return good, folder / "bad.safetensors", alpha.removesuffix(".alpha")


def test_fuse_refuses_an_absurd_alpha_after_the_libraries_loaded(tmp_path, tiny_loras):
    good, bad, module = tiny_loras
    r = _run("fuse", "--content", good, "--style", bad, "--prompt", "a dog", "--method", "direct", "--base",
             "sd15-tiny", "--out", tmp_path / "out", "--steps", "1", "--no-progress")  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lorafuse fuse: error: ") and str(bad) in lines[0] and module in lines[0]
    assert "absurd update" in lines[0] and not (tmp_path / "out").exists()


def test_folder_as_lora_and_empty_report(tmp_path):
    r = _run("inspect", tmp_path)
    assert r.returncode == 2 and r.stderr == f"lorafuse inspect: error: {tmp_path}: is a folder, not a LoRA file\n"
    r = _run("report", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"lorafuse report: error: {tmp_path}: nothing to report")
    assert list(tmp_path.iterdir()) == []


def test_merge_error_comes_alone(tmp_path, tiny_loras):
    """merge imports torchao, whose enum registration made torch 2.13 log a warning to stderr first (fuse too:
    the absurd-alpha test above covers it)."""
    good, _, _ = tiny_loras
    (tmp_path / "out.safetensors").mkdir()
    r = _run("merge", good, good, "--out", tmp_path / "out.safetensors")
    assert r.returncode == 2 and r.stderr.startswith("lorafuse merge: error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
