"""Upper bounds of the train config's size-like numbers, checked when the config loads.

Each of these values sizes an allocation or a loop before any later check (a 10^9 `resolution` ended in a
MemoryError traceback at the first image). Each bound is past every real run and comes from something real;
`lorafuse train --estimate` still says, on a CUDA device, whether a plausible value fits the GPU. Kept free of
torch: the web UI's training form loads the config without it.
"""

from __future__ import annotations

from lorafuse.config.checks import bad

# Pixels per image side (resolution, bucket sizes). The largest default size of the families is 1024 (SDXL,
# FLUX.1; `Family.default_resolution`); 8 times that side is 64 times the pixels, and `--estimate` puts one such
# SD1.5 image (bf16, gradient checkpointing) at 163 GB, past any 80 GB GPU.
MAX_SIDE = 8 * 1024
SIDE_WHY = "any base's training size in pixels"
SIDE_HINT = "; the bases train at 512 (SD1.5) or 1024 (SDXL, FLUX.1)"

# LoRA rank (network_dim, conv_dim, block dims). A rank as large as a layer's narrow side is already full rank;
# the widest narrow side of a trained layer is FLUX.1's 3072 (24 heads x 128), below 4096.
MAX_RANK = 4096

# Images per batch per process. `--estimate` puts 1024 SD1.5 images at 256 px, bf16, gradient checkpointing at
# 163 GB (linear in the batch: 4096 would be ~650 GB, past any single accelerator).
MAX_BATCH = 4096

# Denoising steps of a sample: every sampler of the SD bases walks at most the 1000 training timesteps
# (diffusers' DDIM refuses more); more only repeats them.
MAX_SAMPLE_STEPS = 1000

# T5 tokens of a FLUX.1 caption: FluxPipeline refuses a max_sequence_length above 512.
MAX_T5_TOKENS = 512

# kohya's clip_skip (1 = last layer): SD2.x's OpenCLIP ViT-H text encoder, the deepest one clip_skip applies to
# (SDXL and FLUX.1 ignore it), has 24 layers; past that no transformer layer is left.
MAX_CLIP_SKIP = 24

# Transformer blocks swapped to host memory: only FLUX.1 swaps, and kohya's split (n // 2 of its 19 double
# blocks, 2 (n - n // 2) of its 38 single blocks) runs out at 38.
MAX_BLOCKS_TO_SWAP = 38

# Step and epoch saves are named NAME-step%08d / NAME-%06d: beyond these the names stop sorting by number
# (and 10^8 steps at one a second is three years).
MAX_STEPS = 10**8 - 1
MAX_EPOCHS = 10**6 - 1


def check_at_most(obj: object, limit: int, why: str, *keys: str, hint: str = "") -> None:
    """Every int of `keys` (a value, or each entry of a tuple; None skipped) is <= `limit`: else one message with
    the key, the value, the limit, `why` and what to do (`hint`)."""
    for key in keys:
        value = getattr(obj, key)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, int) and v > limit:
                raise bad(key, f"{v} is larger than {why} (limit {limit}){hint}")
