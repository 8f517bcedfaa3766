import sys

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.train.optim import make_lr_scheduler, make_optimizer, warmup_steps
from lorafuse.train.timesteps import noise_like, sample_timesteps


def test_bias_moves_timesteps_to_the_right_end():
    g = torch.Generator().manual_seed(0)
    none = sample_timesteps(4000, g, bias="none").float().mean()
    content = sample_timesteps(4000, g, bias="content").float().mean()
    style = sample_timesteps(4000, g, bias="style").float().mean()
    assert content > none + 200 and style < none - 200
    t = sample_timesteps(1000, g, t_min=100, t_max=300, bias="content")
    assert t.min() >= 100 and t.max() < 300


def test_noise_offset_shifts_channels():
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(64, 4, 8, 8)
    plain = noise_like(z, torch.Generator().manual_seed(1))
    offset = noise_like(z, torch.Generator().manual_seed(1), noise_offset=0.5)
    per_channel_mean = (offset - plain).mean((2, 3))
    assert per_channel_mean.std() > 0.3 and (offset - plain).std((2, 3)).max() < 1e-5
    del g


def test_warmup_ratio_or_steps():
    assert warmup_steps(0.1, 500) == 50 and warmup_steps(20, 500) == 20


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_schedules_by_kohya_name(name):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer("AdamW", [{"params": [p]}], lr=1.0)
    sched = make_lr_scheduler(name, opt, total_steps=100, lr_warmup_steps=0.1, num_cycles=2)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    if name != "constant":
        assert lrs[0] < 0.2 and lrs[10] == pytest.approx(1.0, abs=0.02)
    if name == "cosine_with_restarts":  # hard restart halfway through the decay
        assert lrs[54] < 0.1 < lrs[56]


def test_unknown_names_and_missing_extras(monkeypatch):
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(UserInputError, match="allowed: AdamW"):
        make_optimizer("Lion9000", [{"params": [p]}], lr=1.0)
    for name, module, extra in (("AdamW8bit", "bitsandbytes", "8bit"), ("Prodigy", "prodigyopt", "prodigy")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # as if not installed
            with pytest.raises(UserInputError, match=rf"pip install 'lorafuse\[{extra}\]'"):
                make_optimizer(name, [{"params": [p]}], lr=1.0)


def _adamw8bit_works_on_cpu() -> str | None:
    """None when bitsandbytes' AdamW8bit steps a CPU parameter here, else why not (the skip reason)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install 'lorafuse[8bit]')"
    try:
        q = torch.nn.Parameter(torch.ones(4096))
        q.grad = torch.ones(4096)
        bnb.optim.AdamW8bit([q], lr=1e-2).step()
    except Exception as e:  # builds without a CPU backend raise various errors
        return f"the installed bitsandbytes has no CPU 8-bit optimizer ({type(e).__name__}: {e})"
    return None


def test_adamw8bit_tracks_adamw_on_cpu():
    """8-bit AdamW follows full-precision AdamW closely on a small quadratic (blockwise-quantised moments)."""
    reason = _adamw8bit_works_on_cpu()
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    target = torch.randn(4096)
    runs = {}
    for name in ("AdamW", "AdamW8bit"):
        w = torch.nn.Parameter(torch.zeros(4096))
        opt = make_optimizer(name, [{"params": [w]}], lr=1e-2, weight_decay=0.0)
        for _ in range(50):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()
        runs[name] = w.detach().clone()
    moved = runs["AdamW"].norm()
    assert moved > 1.0  # the reference did move
    assert (runs["AdamW8bit"] - runs["AdamW"]).norm() < 0.05 * moved
    state = opt.state[w]
    assert state["state1"].dtype == torch.uint8  # the moments really are 8-bit
