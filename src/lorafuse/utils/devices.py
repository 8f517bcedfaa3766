"""`--device` and `--dtype`: one reading of the user's words for every command, checked before any model loads."""

from __future__ import annotations

import torch

from lorafuse.errors import UserInputError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "no": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch floating dtype for "fp32"/"fp16"/"bf16" (and their long names); None stays None (as loaded)."""
    if value is None or isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.strip().lower() in DTYPES:
        return DTYPES[value.strip().lower()]
    raise UserInputError(f"dtype {value!r}: choose one of fp32, fp16, bf16")


def resolve_device(value: str | torch.device | None) -> torch.device | None:
    """A torch device that exists on this machine ("cpu", "cuda", "cuda:1", "mps"); None stays None."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise UserInputError(f"device {value!r}: not a device name ({e}); e.g. cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"device {value!r}: no CUDA device is visible here (torch.cuda.is_available() is "
                                 "False: a CPU build of torch, or no GPU); use --device cpu")  # fmt: skip
        if device.index is not None and device.index >= count:
            raise UserInputError(f"device {value!r}: this machine has {count} CUDA device(s), cuda:0 to "
                                 f"cuda:{count - 1}")  # fmt: skip
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"device {value!r}: Apple's MPS backend is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserInputError(f"device {value!r}: lorafuse runs on cpu, cuda, mps or xpu")
    return device
