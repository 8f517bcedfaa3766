"""optimizer.optimizer_args (kohya's optimizer_args): checked against the optimizer class before any model loads,
carried through kohya imports, TOML files and the kohya flag, reaching the optimizer, and fixed for a resume."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors import safe_open

from lorafuse.config.toml_io import config_from_dict, dump_config, load_config, save_config
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.train import prepare
from lorafuse.train.config import TrainConfig, load_train_config
from lorafuse.train.kohya_import import import_kohya_file, load_train_config_any
from lorafuse.train.optim import make_optimizer
from lorafuse.train.run_setup import check_settings

# The kohya_ss GUI's Prodigy preset, as its saved configs write it
GUI_PRODIGY = [
    "decouple=True", "weight_decay=0.01", "d_coef=2", "use_bias_correction=True", "safeguard_warmup=True",
    "betas=0.9,0.99",
]  # fmt: skip


def _optimizer(optimizer_type: str, base: str = "world-random", **args) -> dict:
    """A whole config's data with these optimizer settings."""
    return {
        "model": {"pretrained_model_name_or_path": base},
        "dataset": {"train_data_dir": "d"},
        "optimizer": {"optimizer_type": optimizer_type, "learning_rate": 1.0, "optimizer_args": args},
    }


def _capture_optimizer(monkeypatch) -> list:
    """The optimizer a training run builds (test code wrapping the builder, not a hook in the trainer)."""
    built = []

    def capture(*args, **kwargs):
        built.append(make_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(prepare, "make_optimizer", capture)
    return built


def test_gui_prodigy_recipe_imports_trains_and_reaches_the_optimizer(tmp_path, world_dataset, monkeypatch):
    kohya = tmp_path / "gui.toml"
    kohya.write_text(
        'pretrained_model_name_or_path = "world-random"\n'
        f'train_data_dir = "{world_dataset.as_posix()}"\ncaption_extension = ".txt"\nresolution = "64,64"\n'
        "network_dim = 4\nnetwork_alpha = 4\ntrain_batch_size = 2\nmax_train_steps = 2\n"
        f'output_dir = "{(tmp_path / "out").as_posix()}"\noutput_name = "run"\n'
        f'optimizer_type = "Prodigy"\nlearning_rate = 1.0\noptimizer_args = {json.dumps(GUI_PRODIGY)}\n'
    )
    imp = import_kohya_file(kohya)
    assert not imp.refused
    rows = {r.key: r.detail for r in imp.rows}
    assert rows["optimizer_args.d_coef"] == "optimizer.optimizer_args.d_coef = 2"
    assert rows["optimizer_args.betas"].startswith("optimizer.betas = [0.9, 0.99]")
    assert rows["optimizer_args.weight_decay"].startswith("optimizer.weight_decay = 0.01")
    cfg, _ = load_train_config_any(kohya)
    o = cfg.optimizer
    assert o.optimizer_args == {"decouple": True, "d_coef": 2, "use_bias_correction": True, "safeguard_warmup": True}
    assert (o.weight_decay, o.betas) == (0.01, (0.9, 0.99))

    built = _capture_optimizer(monkeypatch)
    from lorafuse.train.loop import train_lora

    result = train_lora(cfg, progress_bar=False)
    assert result.global_step == 2 and len(built) == 1
    group = built[0].param_groups[0]
    assert type(built[0]).__name__ == "Prodigy"
    assert (group["d_coef"], group["use_bias_correction"], group["safeguard_warmup"], group["decouple"]) == (
        2.0, True, True, True,
    )  # fmt: skip
    assert group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.01
    assert group["k"] == 2  # Prodigy counts its steps in the group: it really stepped twice
    # the effective config beside the outputs reads back to the same settings; ss_optimizer names the arguments
    assert load_config(TrainConfig, result.config_path).optimizer == o
    with safe_open(str(result.lora_path), "pt") as f:
        ss_optimizer = f.metadata()["ss_optimizer"]
    assert ss_optimizer == "Prodigy(decouple=True,d_coef=2,use_bias_correction=True,safeguard_warmup=True)"


def test_an_unknown_argument_is_one_error_naming_it_and_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainConfig, _optimizer("Prodigy", d_coeff=2, decouple=True), "my.toml")
    message = str(info.value)
    assert message.startswith("my.toml: optimizer.optimizer_args: optimizer_args for Prodigy: d_coeff=2: not an ")
    assert "valid: beta3, d0, d_coef, decouple, eps" in message and "decouple=" not in message
    valid = "valid: beta1, clip_threshold, decay_rate, eps, relative_step, scale_parameter, warmup_init"
    with pytest.raises(ConfigError, match=f"foreach=True: not an argument of Adafactor; {valid}$"):
        config_from_dict(TrainConfig, _optimizer("Adafactor", foreach=True))


@pytest.mark.parametrize(
    ("optimizer_type", "args", "needle"),
    [
        ("Prodigy", {"decouple": "yes"}, "decouple='yes': expected True or False (Prodigy's default is True)"),
        ("Prodigy", {"d_coef": "2"}, "d_coef='2': expected a number"),
        ("Prodigy", {"slice_p": 1.5}, "slice_p=1.5: expected an integer"),
        ("Adafactor", {"eps": [1e-30]}, "eps=[1e-30]: expected 2 numbers"),
        ("AdamW", {"betas": [0.9, 0.99]}, "betas=[0.9, 0.99]: set optimizer.betas"),
        ("AdamW", {"weight_decay": 0.1}, "weight_decay=0.1: set optimizer.weight_decay"),
        ("AdamW", {"lr": 0.1}, "lr=0.1: set optimizer.learning_rate"),
        ("Adafactor", {"relative_step": True}, "lorafuse runs Adafactor with relative_step=False: relative_step"),
    ],
)
def test_a_bad_value_or_an_argument_of_our_fields_is_refused_with_the_reason(optimizer_type, args, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainConfig, _optimizer(optimizer_type, **args))
    assert needle in str(info.value)


def test_a_value_the_optimizer_itself_refuses_fails_before_any_model_loads(tmp_path, train_overrides):
    """Prodigy checks d0 > 0 in its constructor; the run's settings check builds it on a dummy parameter."""
    cfg = config_from_dict(TrainConfig, _optimizer("Prodigy", base="nonexistent-base", d0=-1.0))
    with pytest.raises(UserInputError, match=r"optimizer_args for Prodigy \(d0=-1.0\): Invalid d0 value"):
        check_settings(cfg)  # before the base name is even looked at


def test_optimizer_args_round_trip_through_toml_and_reach_each_optimizer(tmp_path):
    cases = {
        "AdamW": {"amsgrad": True, "eps": 1e-6},
        "Adafactor": {"eps": [1e-30, 2e-3], "clip_threshold": 0.5, "scale_parameter": True},
        "Prodigy": {"d_coef": 0.5, "beta3": 0.98, "growth_rate": 1.02},
    }
    for name, args in cases.items():
        cfg = config_from_dict(TrainConfig, _optimizer(name, **args))
        save_config(cfg, tmp_path / f"{name}.toml")
        again = load_config(TrainConfig, tmp_path / f"{name}.toml")
        assert again == cfg and dump_config(again) == dump_config(cfg), name
        opt = make_optimizer(name, [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1.0, 0.0,
                             optimizer_args=again.optimizer.optimizer_args)  # fmt: skip
        group = opt.param_groups[0]
        for key, value in args.items():
            assert group[key] == (tuple(value) if isinstance(value, list) else value), (name, key)
    adafactor = make_optimizer("Adafactor", [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3)
    assert adafactor.param_groups[0]["scale_parameter"] is False  # lorafuse's default stays when no arg is given


def test_the_kohya_flag_fills_optimizer_args():
    """`lorafuse train --optimizer_type Prodigy --optimizer_args d_coef=2 decouple=True` (argparse's list)."""
    overrides = {"model.pretrained_model_name_or_path": "world-random", "dataset.train_data_dir": "d",
                 "optimizer.optimizer_type": "Prodigy", "optimizer.learning_rate": "1"}  # fmt: skip
    flags = {"optimizer_args": ["d_coef=2", "decouple=True", "betas=0.9,0.99"]}
    cfg, _ = load_train_config_any(None, overrides, flags)
    assert cfg.optimizer.optimizer_args == {"d_coef": 2, "decouple": True} and cfg.optimizer.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match=r"d_coeff=2: not an argument of Prodigy"):
        load_train_config_any(None, overrides, {"optimizer_args": ["d_coeff=2"]})


def test_resume_with_changed_optimizer_args_is_refused(tmp_path, train_overrides):
    from lorafuse.train.loop import train_lora

    first = train_overrides(**{"training.save_state": True, "training.max_train_steps": 1})
    cfg = load_train_config(None, first)
    cfg = config_from_dict(TrainConfig, _with_args(cfg, {"amsgrad": True}))
    state = train_lora(cfg, progress_bar=False).states[-1]
    changed = config_from_dict(TrainConfig, _with_args(cfg, {"amsgrad": False}, resume=str(state)))
    with pytest.raises(UserInputError, match=r"optimizer\.optimizer_args: saved \{'amsgrad': True\}, now \{'amsgrad': False\}"):
        train_lora(changed, progress_bar=False)


def _with_args(cfg: TrainConfig, args: dict, resume: str | None = None) -> dict:
    from lorafuse.config.toml_io import config_to_dict

    data = config_to_dict(cfg)
    data["optimizer"]["optimizer_args"] = args
    if resume:
        data["training"]["resume"] = resume
    return data


# --- the bitsandbytes optimizer types kohya users pick ------------------------------------------------------------


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "Lion", "Lion8bit"])
def test_bitsandbytes_types_step_on_cpu_with_the_states_the_estimate_counts(name):
    """A 64x128 factor (8-bit states) and a 4x8 one (under min_8bit_size: 32-bit states); `--estimate` counts
    the moment bytes the optimizer really holds."""
    from lorafuse.train.estimate import optimizer_bytes

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(4, 8))]
    before = [p.detach().clone() for p in params]
    opt = make_optimizer(name, [{"params": params}], 1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                  if torch.is_tensor(t) and k.startswith("state") and t.numel() > 1)  # fmt: skip
    assert optimizer_bytes(name, params) == moments
    big = opt.state[params[0]]
    assert big["state1"].dtype == (torch.float32 if name == "Lion" else torch.uint8)


def test_bitsandbytes_lion_is_the_papers_update():
    """Chen et al. 2023, Algorithm 2, written out: c = β1 m + (1-β1) g; θ -= lr (sign(c) + λ θ); m = β2 m + (1-β2) g."""
    lr, wd, (b1, b2) = 1e-2, 0.1, (0.9, 0.99)
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(32, 16))
    theta, m = p.detach().clone(), torch.zeros(32, 16)
    opt = make_optimizer("Lion", [{"params": [p]}], lr, weight_decay=wd, betas=(b1, b2))
    for _ in range(3):
        g = torch.randn(32, 16)
        p.grad = g.clone()
        opt.step()
        theta = theta * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-6)


def test_kohya_lion_imports_with_the_class_defaults(tmp_path):
    from lorafuse.train.kohya_import import convert_flat
    from lorafuse.train.optim import CLASS_DEFAULTS, optimizer_class, settable_args

    base = {"pretrained_model_name_or_path": "world-random", "train_data_dir": "d"}
    imp = convert_flat({**base, "optimizer_type": "lion8bit", "optimizer_args": ["min_8bit_size=1024"]})
    assert not imp.refused
    o = config_from_dict(TrainConfig, imp.data).optimizer
    assert (o.optimizer_type, o.weight_decay, o.betas) == ("Lion8bit", 0.0, (0.9, 0.99))
    assert o.optimizer_args == {"min_8bit_size": 1024}
    switched = convert_flat({**base, "use_lion_optimizer": True}).data
    assert config_from_dict(TrainConfig, switched).optimizer.optimizer_type == "Lion"
    for name, defaults in CLASS_DEFAULTS.items():  # the table the import uses is what the classes say
        params = inspect.signature(optimizer_class(name)).parameters
        assert {k: params[k].default for k in defaults} == defaults, name
    assert "min_8bit_size" in settable_args("Lion8bit")
    refused = convert_flat({**base, "optimizer_type": "SGDNesterov"}).refused
    assert refused and "PagedAdamW8bit, Lion, Lion8bit" in refused[0].detail


def test_a_resumed_prodigy_run_with_arguments_ends_bit_identical(tmp_path, train_overrides):
    """The state folder holds Prodigy's d estimate and the arguments in its param_groups; 1 step + resume + 1 step
    must equal 2 uninterrupted steps."""
    from safetensors.torch import load_file

    from lorafuse.train.loop import train_lora

    args = {"d_coef": 2, "use_bias_correction": True, "safeguard_warmup": True}
    over = train_overrides(**{"training.max_train_steps": 2, "training.save_every_n_steps": 1,
                              "training.save_state": True, "network.network_train_unet_only": True})  # fmt: skip
    data = _with_args(load_train_config(None, over), args)
    data["optimizer"].update(optimizer_type="Prodigy", learning_rate=1.0)
    whole = train_lora(config_from_dict(TrainConfig, data), progress_bar=False)
    data["training"].update(output_dir=str(tmp_path / "resumed"), resume=str(whole.states[0]))
    resumed = train_lora(config_from_dict(TrainConfig, data), progress_bar=False)
    assert resumed.global_step == 2
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
