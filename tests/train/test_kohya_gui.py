"""kohya_ss GUI configs as its LoRA tab writes them (lora_gui.py's config_toml_data: every argument of the chosen
LoRA type spelled out, most at their off value), and networks.lora's conv_block_dims rule."""

from __future__ import annotations

import pytest

from lorafuse.config.toml_io import config_from_dict
from lorafuse.errors import ConfigError
from lorafuse.lora.keys import UnetLayout
from lorafuse.models.tiny import tiny_pipeline
from lorafuse.train.config import NetworkConfig, TrainConfig
from lorafuse.train.kohya_import import convert_flat
from lorafuse.train.network import block_labels, block_of, is_3x3_conv, plan_network

BASE = {"pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d", "resolution": "512,512"}
# the GUI's f-strings for each LoRA type, after its .replace('"', "").split() (kohya_gui/lora_gui.py)
GUI_ARGS = {
    "LyCORIS/LoCon": "preset=full conv_dim=8 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False "
    "dora_wd=False module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=locon "
    "train_norm=False",
    "LyCORIS/LoHa": "preset=full conv_dim=4 conv_alpha=4 use_tucker=False rank_dropout=0 bypass_mode=False "
    "dora_wd=False module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=loha "
    "train_norm=False",
    "LyCORIS/LoKr": "preset=full conv_dim=100000 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False "
    "dora_wd=False module_dropout=0 factor=8 use_cp=False use_scalar=False decompose_both=False "
    "rank_dropout_scale=False algo=lokr train_norm=False",
    "Kohya LoCon": "conv_dim=8 conv_alpha=1",
}


@pytest.mark.parametrize("lora_type", sorted(GUI_ARGS))
def test_gui_network_args_import_without_refusals(lora_type):
    module = "networks.lora" if lora_type.startswith("Kohya") else "lycoris.kohya"
    flat = {**BASE, "network_module": module, "network_args": GUI_ARGS[lora_type].split()}
    imp = convert_flat(flat)
    assert not imp.refused, imp.table()
    net = config_from_dict(TrainConfig, imp.data, "<gui>").network
    given = dict(a.split("=") for a in GUI_ARGS[lora_type].split())
    assert net.network_module == module and net.conv_dim == int(given["conv_dim"])
    if module == "lycoris.kohya":
        assert net.algo == lora_type.split("/")[1].lower()
        assert net.factor == (8 if net.algo == "lokr" else -1)
    # each spelled-out off value has its own row: nothing dropped without a word
    assert set(given) <= {r.key.split(".", 1)[1] for r in imp.rows if r.key.startswith("network_args.")}


@pytest.mark.parametrize(
    ("arg", "reason"),
    [
        ("rank_dropout=0.1", "rank dropout and module dropout are not implemented"),
        ("use_tucker=True", "Tucker decomposition"),
        ("dora_wd=True", "DoRA is not implemented"),
        ("train_on_input=True", "IA3"),
        ("frobnicate=3", "unknown network argument"),
        ("factor=abc", "not a value kohya accepts"),
    ],
)
def test_network_args_that_change_training_are_refused_by_name(arg, reason):
    imp = convert_flat({**BASE, "network_module": "lycoris.kohya", "network_args": ["algo=loha", arg]})
    (row,) = imp.refused
    assert row.key == f"network_args.{arg.split('=')[0]}" and reason in row.detail
    with pytest.raises(ConfigError, match=arg.split("=")[0]):
        imp.check("gui.toml")


def test_bucket_limits_are_rounded_as_kohya_rounds_them():
    imp = convert_flat({**BASE, "min_bucket_reso": 320, "max_bucket_reso": 1000, "bucket_reso_steps": 64})
    ds = config_from_dict(TrainConfig, imp.data, "<gui>").dataset
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (320 - 320 % 64, 1024)  # kohya: min down, max up
    assert any("kohya rounds it" in r.detail for r in imp.rows if r.key == "max_bucket_reso")


def _ranks(net: NetworkConfig):
    pipe = tiny_pipeline("sd15", seed=0)
    plan = plan_network(pipe, net, "sd15")["unet"]
    layout = UnetLayout.from_config(pipe.unet.config)
    conv = {p: v for p, v in plan.items() if is_3x3_conv(pipe.unet.get_submodule(p))}
    lin = {p: v for p, v in plan.items() if p not in conv}
    return pipe, layout, conv, lin


def test_block_dims_zero_keeps_the_blocks_3x3_convs_at_conv_dim_as_kohya():
    labels = block_labels(tiny_pipeline("sd15", seed=0).unet)
    dims = tuple(0 if label == "IN01" else 4 for label in labels)
    _, layout, conv, lin = _ranks(NetworkConfig(block_dims=dims, conv_dim=2, network_train_unet_only=True))
    assert "IN01" not in {block_of(p, layout) for p in lin}  # its Linear / 1x1 layers: rank 0, no LoRA
    in01 = {p: v for p, v in conv.items() if block_of(p, layout) == "IN01"}
    assert in01 and set(in01.values()) == {(2, 1.0)}  # kohya: conv_block_dims = [conv_dim] * blocks


def test_conv_block_dims_rank_each_blocks_3x3_convs():
    labels = block_labels(tiny_pipeline("sd15", seed=0).unet)
    cdims = tuple(0 if label == "OUT02" else i % 3 + 1 for i, label in enumerate(labels))
    calphas = tuple(float(i) for i in range(len(labels)))
    net = NetworkConfig(
        block_dims=(4,) * len(labels), conv_block_dims=cdims, conv_block_alphas=calphas, network_train_unet_only=True
    )
    _, layout, conv, lin = _ranks(net)
    assert conv and set(lin.values()) == {(4, 1.0)}
    for path, (rank, alpha) in conv.items():
        i = labels.index(block_of(path, layout))
        assert (rank, alpha) == (cdims[i], calphas[i]), path
    assert "OUT02" not in {block_of(p, layout) for p in conv}


def test_conv_block_dims_without_block_mode_is_refused_or_noted():
    with pytest.raises(ConfigError, match="conv_block_dims.*block_dims or a block LR weight"):
        NetworkConfig(conv_block_dims=(4,) * 25)
    # kohya ignores it there: a GUI config that carries it gets a row saying so, not an error
    imp = convert_flat({**BASE, "network_args": ["conv_dim=4", "conv_block_dims=" + ",".join(["4"] * 25)]})
    assert not imp.refused
    (row,) = [r for r in imp.rows if r.key == "network_args.conv_block_dims"]
    assert row.action == "no effect" and "block_dims" in row.detail


def test_gui_settings_files_are_refused_with_what_to_pass(tmp_path):
    """The GUI's own saved settings (JSON, as its presets) carry form fields, not train_network.py options."""
    import json

    from lorafuse.train.kohya_import import load_train_config_any

    saved = {"LoRA_type": "LyCORIS/LoHa", "max_resolution": "512,512", "optimizer": "AdamW8bit", "lr_warmup": 10,
             "pretrained_model_name_or_path": "sd15-tiny", "train_data_dir": "d"}  # fmt: skip
    as_json = tmp_path / "my_lora.json"
    as_json.write_text(json.dumps(saved))
    as_toml = tmp_path / "my_lora.toml"
    as_toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in saved.items()))
    for path in (as_json, as_toml):
        with pytest.raises(ConfigError, match=r"kohya_ss GUI.*LoRA_type.*config_lora-<date>-<time>\.toml"):
            load_train_config_any(path)
    other = tmp_path / "x.json"
    other.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="TOML files, not JSON"):
        load_train_config_any(other)


CONFIG_README_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\\\\hoge'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = 'C:\\\\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\\\\reg'
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\\\\piyo'
  metadata_file = 'C:\\\\piyo\\\\piyo_md.json'
"""


def test_kohya_config_readme_dataset_configs(tmp_path):
    """The examples of kohya's docs/config_README: the first names its two settings lorafuse does not reproduce
    (a fine-tuning metadata subset, two batch sizes); without them its DreamBooth part maps subset by subset."""
    import json

    first = tmp_path / "first.toml"
    first.write_text(CONFIG_README_EXAMPLE)
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "dataset_config": str(first)})
    assert {r.key for r in imp.refused} == {"datasets[1].subsets[0].metadata_file", "batch_size"}
    dreambooth = tmp_path / "db.toml"
    dreambooth.write_text(CONFIG_README_EXAMPLE[: CONFIG_README_EXAMPLE.index("[[datasets]]\nresolution = [768")])
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "dataset_config": str(dreambooth)})
    assert not imp.refused, imp.table()
    cfg = config_from_dict(TrainConfig, imp.data, "<readme>")
    subsets = cfg.dataset.subsets
    assert [s.keep_tokens for s in subsets] == [2, 3, 1] and [s.is_reg for s in subsets] == [False, False, True]
    assert cfg.training.train_batch_size == 4 and cfg.dataset.caption_extension == ".txt"
    # num_repeats in [general] (config_README: general, datasets or subset), a JSON dataset config, and two
    # datasets of different resolutions (each subset keeps its own)
    as_json = tmp_path / "ds.json"
    as_json.write_text(json.dumps({"general": {"num_repeats": 3, "caption_extension": ".txt"}, "datasets": [
        {"resolution": 512, "subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": 5}]},
        {"resolution": 768, "skip_image_resolution": 512, "subsets": [{"image_dir": "a"}]}]}))  # fmt: skip
    imp = convert_flat({"pretrained_model_name_or_path": "sd15-tiny", "dataset_config": str(as_json)})
    assert [r.key for r in imp.refused] == ["datasets[1].skip_image_resolution"]
    imp.refused.clear()
    cfg = config_from_dict(TrainConfig, imp.data, "<json>")
    assert [s.num_repeats for s in cfg.dataset.subsets] == [3, 5, 3]
    assert [s.resolution for s in cfg.dataset.subsets] == [512, 512, 768] and cfg.dataset.resolution == 512


def test_a_step_limit_on_the_command_line_wins_over_the_guis_epoch(tmp_path):
    from lorafuse.train.kohya_import import load_train_config_any

    cfg_file = tmp_path / "gui.toml"
    cfg_file.write_text('pretrained_model_name_or_path = "sd15-tiny"\ntrain_data_dir = "d"\nepoch = 10\n')
    cfg, imp = load_train_config_any(cfg_file)
    assert cfg.training.max_train_epochs == 10  # alone, the GUI's epoch count is the run's length
    cfg, imp = load_train_config_any(cfg_file, {"training.max_train_steps": "3"})
    assert (cfg.training.max_train_steps, cfg.training.max_train_epochs) == (3, None)
    assert any(r.key == "epoch" and r.action == "no effect" for r in imp.rows)


def test_sectioned_kohya_configs_are_read_flat_as_kohya_reads_them(tmp_path):
    """kohya's read_config_from_file takes one level of tables ([model_arguments], [training_arguments], ...) as
    flat keys: many shared configs are written that way."""
    from lorafuse.train.kohya_import import load_train_config_any

    path = tmp_path / "sectioned.toml"
    path.write_text(
        '[model_arguments]\npretrained_model_name_or_path = "sd15-tiny"\nv2 = false\n'
        '[additional_network_arguments]\nnetwork_module = "networks.lora"\nnetwork_dim = 8\nnetwork_alpha = 4\n'
        '[dataset_arguments]\ntrain_data_dir = "d"\nresolution = "512,512"\n'
        '[training_arguments]\nmax_train_steps = 7\nsave_precision = "fp16"\nxformers = true\n'
        '[sample_prompt_arguments]\nsample_every_n_epochs = 1\nsample_sampler = "ddim"\n'
    )
    cfg, imp = load_train_config_any(path)
    assert (cfg.network.network_dim, cfg.network.network_alpha, cfg.training.max_train_steps) == (8, 4.0, 7)
    assert cfg.training.save_precision == "fp16" and cfg.dataset.resolution == 512
    # no prompt file: kohya logs it and trains without samples; here the same, said in the table
    assert cfg.training.sample_every_n_epochs is None
    (row,) = [r for r in imp.rows if r.key == "sample_every_n_epochs"]
    assert row.action == "no effect" and "no sample_prompts" in row.detail
    ours = tmp_path / "ours.toml"
    ours.write_text('[model]\npretrained_model_name_or_path = "sd15-tiny"\n[dataset]\ntrain_data_dir = "d"\n')
    assert load_train_config_any(ours)[1] is None  # our own tables stay ours
