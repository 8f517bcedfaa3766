"""The method contract: shared input checks, cleanup on error, one config builder, loud registry errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lorafuse.errors import ConfigError, UserInputError
from lorafuse.fusion import registry
from lorafuse.fusion.common import fuse_sum
from lorafuse.fusion.registry import FusionConfig, FusionMethod, get_method, make_config, method_names
from lorafuse.fusion.synthetic import random_lora
from lorafuse.lora.merge import is_fused


@pytest.mark.parametrize("name", ["direct", "klora", "craft"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_is_named_as_such(name, value) -> None:
    # the range check alone would call NaN "out of range"; the message must say what is wrong, whether the value
    # comes as an option (typed by the config reader) or inside a config object (FusionConfig.validate)
    with pytest.raises(UserInputError, match=rf"{name}: .*content_weight.* must be a finite number, got {value}"):
        make_config(name, content_weight=value)
    with pytest.raises(UserInputError, match=rf"{name}: option content_weight must be a finite number, got {value}"):
        get_method(name).config_cls(content_weight=value).validate(name)


def test_config_object_plus_options_and_unknown_keys() -> None:
    base = make_config("klora", None, selection="random")
    cfg = make_config("klora", base, random_p=0.25)
    assert (cfg.selection, cfg.random_p) == ("random", 0.25)
    with pytest.raises(ConfigError, match=r"klora: unknown option\(s\) 'selektion'"):
        make_config("klora", base, selektion="fixed")
    with pytest.raises(UserInputError, match="expected a KLoraConfig"):
        make_config("klora", make_config("direct"))


def test_record_is_json_ready() -> None:
    cfg = make_config("ziplora", content_image=torch.zeros(1), mergers="m.safetensors")
    record = cfg.record()
    assert record["content_image"] == "<Tensor>" and record["mergers"] == "m.safetensors"
    assert record["content_weight"] == 1.0


def test_unknown_builtin_module_fails_loudly(monkeypatch) -> None:
    monkeypatch.setattr(registry, "BUILTIN_MODULES", (*registry.BUILTIN_MODULES, "kloraa"))
    with pytest.raises(ModuleNotFoundError, match="kloraa"):
        method_names()


def test_methods_declare_what_callers_ask() -> None:
    # callers outside fusion/ read these instead of branching on method names
    assert [m for m in method_names() if get_method(m).needs_references] == ["ziplora"]
    assert {get_method(m).lora_layers for m in method_names()} == {"locon", "craft"}
    paper = {m: get_method(m).paper_inputs for m in method_names()}
    assert {inputs for inputs, _ in paper.values()} == {"locon", "attn", "blora", "craft"}
    assert paper["klora"] == ("attn", {"non_attention": "ignore"}) and paper["blora"][0] == "blora"
    for m, (_, options) in paper.items():  # every declared option is one the method takes
        assert set(options) <= set(get_method(m).config_cls.__dataclass_fields__), m


@dataclass
class _FailingConfig(FusionConfig):
    pass


class _FailsAfterFusing(FusionMethod):
    """Fuses, then fails: `plan()` must undo the fusion before the error reaches the caller."""

    name = "fails_after_fusing"
    config_cls = _FailingConfig

    def _build(self, plan, pipe, content, style, config) -> None:
        plan.record.update(fuse_sum(pipe, [(content, 1.0)], plan.undo))
        assert is_fused(pipe)
        raise RuntimeError("boom")


def test_plan_undoes_partial_work_on_error(sd15) -> None:
    content, style = random_lora(sd15, seed=1, rank=2), random_lora(sd15, seed=2, rank=2)
    before = {k: v.clone() for k, v in sd15.unet.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        _FailsAfterFusing().plan(sd15, content, style, _FailingConfig())
    assert not is_fused(sd15)
    after = sd15.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shared_checks_run_before_build(sd15) -> None:
    content, style = random_lora(sd15, seed=1, rank=2), random_lora(sd15, seed=2, rank=2)
    with pytest.raises(UserInputError, match="fails_after_fusing: expected a _FailingConfig, got DirectConfig"):
        _FailsAfterFusing().plan(sd15, content, style, make_config("direct"))
    next(iter(content.modules.values())).up[0, 0] = math.nan
    with pytest.raises(UserInputError, match="non-finite"):
        _FailsAfterFusing().plan(sd15, content, style, _FailingConfig())
    assert not is_fused(sd15)
