"""`lorafuse train` with the joint B-LoRA preset: one LoRA on exactly the two B-LoRA blocks, which the B-LoRA fusion
then splits (content block of one such LoRA, style block of another)."""

from __future__ import annotations

import subprocess
import sys
import warnings

from lorafuse.fusion.blora import BLoraConfig, blora_parts
from lorafuse.lora.io import load_lora
from lorafuse.lora.presets import resolve_layers
from lorafuse.models.load import load_base_pipeline


def test_cli_trains_a_joint_blora_that_blora_fusion_splits(train_overrides, tmp_path):
    overrides = train_overrides(**{"network.layers": "blora", "network.network_train_unet_only": "true",
                                   "training.max_train_steps": "2"})  # fmt: skip
    cmd = [sys.executable, "-m", "lorafuse", "train"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    path = tmp_path / "out" / "run.safetensors"
    pipe = load_base_pipeline("world-random")
    state = load_lora(path, base=pipe)
    covered = {k.removeprefix("unet.") for k in state.modules}
    assert covered == set(resolve_layers(pipe, "blora"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both blocks fully covered: no coverage warning either
        parts, record = blora_parts(pipe, state, state, BLoraConfig())
    assert record["content"]["kept_modules"] == record["style"]["kept_modules"] == len(covered) // 2
    assert record["content"]["dropped_modules"] == len(covered) // 2
