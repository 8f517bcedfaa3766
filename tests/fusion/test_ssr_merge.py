"""SSR-Merge against a slow reference: the calibration inputs recorded through a full sampling run, the router
solved as an ordinary ridge least-squares problem (lstsq, not the streaming normal equations), ΔW = B R A dense;
plus identity routing where one LoRA is alone, the official "Linear only" option, prompts and restoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafuse.errors import UserInputError
from lorafuse.families import family_of
from lorafuse.fusion.registry import get_method, make_config
from lorafuse.fusion.sampling import sample
from lorafuse.fusion.synthetic import random_lora
from lorafuse.guidance import FunctionHook
from lorafuse.lora.merge import fuse_into, unfuse
from lorafuse.lora.targets import components_of

CONTENT_PROMPT, STYLE_PROMPT = "a photo of a sks dog", "in sks style"
OPTIONS = {"content_prompt": CONTENT_PROMPT, "style_prompt": STYLE_PROMPT, "calib_schedule_steps": 4,
           "calib_steps": 2, "calib_guidance": 5.0, "ridge": 1e-3, "seed": 3}  # fmt: skip


def denoiser(pipe) -> str:
    return family_of(pipe).denoiser_component  # "unet", or "transformer" on FLUX.1


def unet_lora(pipe, seed, rank, keep=None):
    # attention projections, 1x1 proj convs/linears and 3x3 resnet convs (LoCon), so convs are routed too; on
    # FLUX.1 the transformer's attention projections, its text stream's too, and the single blocks' proj_out
    comp = denoiser(pipe)
    keep = keep or (lambda ref: ref.component == comp and ref.path.endswith(
        ("to_q", "to_v", "proj_in", "conv1", "add_q_proj", "proj_out")))  # fmt: skip
    return random_lora(pipe, seed=seed, rank=rank, scale=0.3, keep=keep)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in components_of(pipe)[denoiser(pipe)].state_dict().items()}


def plan_of(pipe, content, style, **options):
    return get_method("ssr")().plan(pipe, content, style, make_config("ssr", **{**OPTIONS, **options}))


def record_inputs(pipe, state, weight, prompt, layers) -> dict[str, list[torch.Tensor]]:
    """The inputs of `layers` during the first calib_steps steps of a full run of the model with `state` fused."""
    unet = components_of(pipe)[denoiser(pipe)]
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    recording = {"on": False}
    handles = [unet.get_submodule(p).register_forward_hook(
        lambda _m, args, _o, p=p: seen[p].append(args[0].detach().double()) if recording["on"] else None)
        for p in layers]  # fmt: skip

    def gate(i, num_steps, _unet):
        recording["on"] = i < OPTIONS["calib_steps"]

    fuse_into(pipe, state, weight)
    try:
        sample(pipe, prompt, steps=OPTIONS["calib_schedule_steps"], guidance=OPTIONS["calib_guidance"],
               seed=OPTIONS["seed"], hooks=[FunctionHook(gate)], output="latent", progress=False)  # fmt: skip
    finally:
        unfuse(pipe)
        for h in handles:
            h.remove()
    return seen


def signals(layer, down, x) -> torch.Tensor:
    """z = A x per token, (tokens, R): conv inputs unfolded into patches, then a plain matrix product."""
    if down.dim() == 4:
        patches = F.unfold(x, down.shape[-2:], padding=layer.padding, stride=layer.stride)  # (B, in·k·k, L)
        return (down.flatten(1).double() @ patches).permute(0, 2, 1).reshape(-1, down.shape[0])
    if isinstance(layer, torch.nn.Conv2d):  # 2-D LoRA on a 1x1 conv: channels are the features
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1, x.shape[-1]) @ down.double().T


def reference_deltas(pipe, content, style, w_c, w_s) -> dict[str, torch.Tensor]:
    paths = [key.removeprefix(f"{denoiser(pipe)}.") for key in content.modules]
    inputs = [record_inputs(pipe, state, w, prompt, paths)
              for state, w, prompt in ((content, w_c, CONTENT_PROMPT), (style, w_s, STYLE_PROMPT))]  # fmt: skip
    return {key: reference_delta(pipe, content, style, w_c, w_s, key, inputs) for key in content.modules}


def reference_delta(pipe, content, style, w_c, w_s, key, inputs) -> torch.Tensor:
    path = key.removeprefix(f"{denoiser(pipe)}.")
    layer = components_of(pipe)[denoiser(pipe)].get_submodule(path)
    mods = (content.modules[key], style.modules[key])
    downs = [m.down if not (isinstance(layer, torch.nn.Conv2d) and m.down.dim() == 2) else m.down[:, :, None, None]
             for m in mods]  # fmt: skip
    ups = [w * m.scale * m.up.flatten(1) for m, w in zip(mods, (w_c, w_s), strict=True)]
    r_c = downs[0].shape[0]
    a = torch.cat(downs)
    rows, targets = [], []
    for task in range(2):
        for x in inputs[task][path]:
            z = signals(layer, a, x)
            t = torch.zeros_like(z)
            own = slice(0, r_c) if task == 0 else slice(r_c, a.shape[0])
            t[:, own] = z[:, own]  # the target: task k's own signal in its own block, the other block silent
            rows.append(z)
            targets.append(t)
    z, t = torch.cat(rows), torch.cat(targets)
    n, r = z.shape
    # ridge as extra rows: min ‖z Rᵀ − t‖² + λ n ‖R‖², the same problem as R (G/N + λI) = Q/N
    lam = (OPTIONS["ridge"] * n) ** 0.5 * torch.eye(r, dtype=torch.float64)
    router = torch.linalg.lstsq(torch.cat([z, lam]), torch.cat([t, torch.zeros(r, r, dtype=torch.float64)])).solution.T
    delta = torch.cat(ups, dim=1).double() @ router @ a.flatten(1).double()
    return delta.reshape(layer.weight.shape)


@pytest.mark.parametrize("arch", ["sd15", "world", "flux"])
def test_merge_equals_the_least_squares_router(arch, request) -> None:
    pipe = request.getfixturevalue(arch)
    content, style = unet_lora(pipe, 1, (2, 3)), unet_lora(pipe, 2, 2)
    before = weights(pipe)
    expected = reference_deltas(pipe, content, style, 0.9, 1.2)  # on the plain base, before the plan fuses
    plan = plan_of(pipe, content, style, content_weight=0.9, style_weight=1.2)
    try:
        after = weights(pipe)
        assert plan.record["routed_layers"] == len(content.modules) and plan.record["summed_layers"] == 0
        convs = 0
        for key in content.modules:
            path = key.removeprefix(f"{denoiser(pipe)}.")
            got = (after[f"{path}.weight"] - before[f"{path}.weight"]).double()
            want = expected[key]
            direct = (0.9 * content.modules[key].delta_weight(got.shape) + 1.2 * style.modules[key].delta_weight(
                got.shape)).double()  # fmt: skip
            assert (got - direct).abs().max() > 1e-3 * direct.abs().max(), key  # routing is not the plain sum
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * want.abs().max().item(), msg=key)
            convs += got.dim() == 4 and got.shape[-1] == 3
        assert convs > 0 or arch == "flux"  # FLUX.1's transformer has no convs
    finally:
        plan.close()
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


def test_a_layer_with_one_lora_keeps_it_and_official_sums_convs(sd15) -> None:
    content = unet_lora(sd15, 3, 2)
    style = unet_lora(sd15, 4, 2, keep=lambda ref: ref.component == "unet" and ref.path.endswith(("to_q", "conv1")))
    before = weights(sd15)
    plan = plan_of(sd15, content, style, route_convs=False)
    try:
        after = weights(sd15)
        for key, module in content.modules.items():
            path = key.removeprefix("unet.")
            got = after[f"{path}.weight"] - before[f"{path}.weight"]
            layer = sd15.unet.get_submodule(path)
            direct = module.delta_weight(got.shape) + (
                style.modules[key].delta_weight(got.shape) if key in style.modules else 0)
            if key not in style.modules or isinstance(layer, torch.nn.Conv2d):
                # identity routing: content alone (to_v, proj_in), or the official Linear-only hooks (conv1)
                torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6, msg=key)
            else:
                assert (got - direct).abs().max() > 1e-4, key
        assert plan.record["summed_layers"] > 0 and plan.record["routed_layers"] > 0
    finally:
        plan.close()


def test_calibration_prompts_from_markers_and_errors(sd15) -> None:
    method = get_method("ssr")
    _, cfg = method.prepare_prompt("a photo of a sks dog <c>, in sks style <s>", make_config("ssr"))
    assert cfg.calibration_prompts() == ("a photo of a sks dog", "in sks style")
    _, cfg = method.prepare_prompt("a dog in sks style", make_config("ssr", style_prompt="sks style"))
    assert cfg.calibration_prompts() == ("a dog in sks style", "sks style")
    content, style = unet_lora(sd15, 5, 2), unet_lora(sd15, 6, 2)
    with pytest.raises(UserInputError, match="ssr: no calibration prompt for the content LoRA"):
        method().plan(sd15, content, style, make_config("ssr"))
    for bad, match in (({"calib_steps": 30}, "calib_steps"), ({"ridge": -1.0}, "ridge"),
                       ({"content_prompt": " "}, "content_prompt")):  # fmt: skip
        with pytest.raises(UserInputError, match=f"ssr: option {match}"):
            make_config("ssr", **bad)
