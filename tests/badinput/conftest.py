"""Shared pieces of the bad-input tests: run the CLI in-process, snapshot a folder, make small real-shaped LoRAs.

Every refusal is checked the same way (`refused`): exit status 2, one `error:` line naming the file or key and
the problem, no traceback, and the watched folder byte-for-byte unchanged (nothing written, nothing left).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lorafuse.cli.main import main


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: content hash, or 'dir' / 'link -> target'} of everything under `folder`, hidden included."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link -> {p.readlink()}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


class Cli:
    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *argv: object) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors (a bad option value) exit from inside main
            code = e.code
        out, err = self.capsys.readouterr()
        return code, out, err

    def refused(self, argv: list[object], *expected: str, watch: Path | None = None) -> str:
        """Run `argv`; assert a clean refusal whose message holds every `expected` text; return the message."""
        before = snapshot(watch) if watch is not None else None
        code, out, err = self(*argv)
        assert code == 2, (code, out, err)
        assert "Traceback" not in err and "Traceback" not in out, err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1, err
        for text in expected:
            assert text in errors[0], f"{text!r} not in {errors[0]!r}"
        if watch is not None:
            assert snapshot(watch) == before, "the refused command changed files"
        return errors[0]


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)




def make_state(arch: str = "sd15", seed: int = 0, rank: int = 2, alpha: float | None = 1.0, n: int = 4):
    from lorafuse.lora.state import LoraModule, LoraState
    from lorafuse.lora.targets import reference_modules

    refs = reference_modules(arch).modules
    keys = sorted(k for k in refs if k.endswith("attn2.to_k"))[:n]
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for k in keys:
        out_f, in_f = refs[k].shape
        modules[k] = LoraModule(
            down=torch.randn(rank, in_f, generator=g) * 0.05,
            up=torch.randn(out_f, rank, generator=g) * 0.05,
            alpha=alpha,
        )
    return LoraState(modules=modules)


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    """Good kohya files: an SD1.5 one, a second SD1.5 one, and an SDXL one (small: 4 modules each)."""
    from lorafuse.lora.io import save_lora

    folder = tmp_path_factory.mktemp("loras")
    return {
        "sd15": save_lora(make_state("sd15", 0), folder / "sd15.safetensors", arch="sd15"),
        "sd15b": save_lora(make_state("sd15", 1), folder / "sd15b.safetensors", arch="sd15"),
        "sdxl": save_lora(make_state("sdxl", 2), folder / "sdxl.safetensors", arch="sdxl"),
    }


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, lora_files):
    """What the writing commands read: a dataset, images, a run folder, a grid and a kohya config."""
    import numpy as np
    from PIL import Image

    from lorafuse.world.dataset import write_subject_dataset

    root = tmp_path_factory.mktemp("inputs")
    write_subject_dataset("robot_09", root / "ds", n=1, repeats=1)
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / f"{k}.png")
    (root / "run").mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "run" / "grid.png")
    (root / "grid.toml").write_text(f'prompt = "a dog"\n[axes]\nbase = ["sd15-tiny"]\ncheckpoint = '
                                    f'["{lora_files["sd15"]}"]\nsteps = [2]\n[metrics]\n')  # fmt: skip
    (root / "kohya.toml").write_text(
        f'pretrained_model_name_or_path = "world-random"\ntrain_data_dir = "{root / "ds"}"\nresolution = "64,64"\n'
        'network_module = "networks.lora"\nnetwork_dim = 4\nnetwork_alpha = 4\nmax_train_steps = 2\n'
    )
    return root


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory) -> Path:
    """A LoRA that fits the tiny SD1.5 base (bake, fuse and grid apply it)."""
    from lorafuse.lora.io import save_lora
    from lorafuse.lora.state import LoraModule, LoraState
    from lorafuse.lora.targets import base_modules
    from lorafuse.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd15", seed=0)
    mods = base_modules(pipe).modules
    g = torch.Generator().manual_seed(0)
    keys = [k for k in sorted(mods) if k.endswith("attn2.to_k")][:2]
    state = LoraState({k: LoraModule(torch.randn(2, mods[k].shape[1], generator=g) * 0.1,
                                     torch.randn(mods[k].shape[0], 2, generator=g) * 0.1, 1.0) for k in keys})  # fmt: skip
    return save_lora(state, tmp_path_factory.mktemp("tiny") / "tiny.safetensors", arch="sd15", base=pipe)


@pytest.fixture
def no_model(monkeypatch):
    """Refusals come before any model loads. `train.prepare` binds load_base_pipeline when it is imported: it is
    imported here first (so it never keeps this fixture's stand-in after the test) and its name replaced too."""
    import lorafuse.models.load as load
    import lorafuse.train.prepare as prepare

    def loaded(*a, **k):
        pytest.fail("a model was loaded")

    monkeypatch.setattr(load, "load_base_pipeline", loaded)
    monkeypatch.setattr(prepare, "load_base_pipeline", loaded)


@pytest.fixture(scope="session")
def h():
    """Helper functions (test modules cannot import conftest under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(
        snapshot=snapshot, make_state=make_state, write_tensors=write_tensors, kohya_tensors=kohya_tensors
    )


@pytest.fixture
def data(tmp_path_factory):
    """A kohya folder of two captioned 32-pixel images, for train commands refused or run at tiny size."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("ds")
    sub = folder / "2_sks dog"
    sub.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(sub / f"{k}.png")
        (sub / f"{k}.txt").write_text("a sks dog")
    return folder
