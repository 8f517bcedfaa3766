"""Give freed memory back to the operating system.

PyTorch frees CPU tensors, and CPython its objects, into the C allocator, which keeps the pages for reuse: after a
burst (VAE activations while caching latents, the model and optimizer at the end of a run) the process stays at
its high-water mark even though the objects are gone, and the next burst (the first training steps, matplotlib
drawing the loss plot) comes on top of it. glibc's `malloc_trim(0)` returns the free pages of every arena to the
OS, so the next burst starts from the live working set. Elsewhere (macOS, musl) this is only a garbage collection.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library already loaded into this process
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


def release_memory() -> None:
    """Collect garbage (reference cycles keep modules alive), then hand free heap pages back to the OS."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
