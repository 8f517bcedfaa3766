"""kohya configs in: the kohya_ss GUI's flat TOML, kohya flags, and --dataset_config, for SD1.5 and SDXL."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafuse.cli.main import main
from lorafuse.cli.train import options
from lorafuse.config.toml_io import config_from_dict
from lorafuse.errors import ConfigError
from lorafuse.train.config import TrainConfig, load_train_config
from lorafuse.train.kohya_import import convert_flat, import_kohya_file, load_train_config_any, read_toml
from lorafuse.train.kohya_keys import RULES

REPO = Path(__file__).resolve().parents[2]
SD15 = REPO / "examples" / "kohya" / "sd15_character_lora.toml"
SDXL = REPO / "examples" / "kohya" / "sdxl_style_lora.toml"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the examples name their prompt and dataset files relative to the repo root


def _build(imp) -> TrainConfig:
    return config_from_dict(TrainConfig, imp.data, "<kohya>")


def _covered(imp, flat) -> None:
    """Every key of the kohya file shows up in the mapping table: nothing silently dropped."""
    seen = {row.key.split(".")[0].split(" ")[0].split("[")[0] for row in imp.rows}
    assert set(flat) <= seen, set(flat) - seen


def test_every_mapped_kohya_key_names_a_real_field():
    # options() leaves out arrays of tables and tables of values
    keys = {o.key for o in options()} | {"dataset.subsets", "optimizer.optimizer_args"}
    for name, rule in RULES.items():
        if rule.action == "map":
            assert rule.target in keys, (name, rule.target)
        else:
            assert rule.reason, name


def test_sd15_gui_config(in_repo):
    imp = import_kohya_file(SD15)
    _covered(imp, read_toml(SD15))
    cfg = _build(imp)
    assert cfg.model.clip_skip == 2 and cfg.dataset.resolution == 512
    assert cfg.dataset.train_data_dir == Path("data/geralt") and cfg.dataset.caption_extension == ".txt"
    assert cfg.dataset.max_token_length == 150 and cfg.dataset.enable_bucket and cfg.dataset.keep_tokens == 1
    assert (cfg.network.network_dim, cfg.network.network_alpha) == (128, 64.0)
    assert cfg.optimizer.optimizer_type == "AdamW8bit"
    assert (cfg.optimizer.unet_lr, cfg.optimizer.text_encoder_lr) == (1e-4, 5e-5)
    assert cfg.scheduler.lr_scheduler == "cosine_with_restarts" and cfg.scheduler.lr_scheduler_num_cycles == 4
    assert (cfg.loss.loss_type, cfg.loss.huber_c, cfg.loss.huber_schedule) == ("huber", 0.1, "snr")
    tc = cfg.training
    assert (tc.max_train_steps, tc.train_batch_size, tc.save_precision, tc.save_last_n_epochs) == (
        4000,
        2,
        "fp16",
        2,
    )
    assert tc.sample_prompts == (  # negative prompts kept, the other per-prompt options noted as dropped
        "geralt of rivia --n lowres, bad anatomy",
        "geralt of rivia, 1boy, upper body, realistic --n lowres",
    )
    notes = {r.key: r for r in imp.rows if r.action == "no effect"}
    assert "xformers" not in notes and "sdpa" in notes and "sample_prompts --w" in notes
    assert "sample_prompts --n" not in notes


def test_sdxl_gui_config_with_dataset_config(in_repo):
    imp = import_kohya_file(SDXL)
    _covered(imp, read_toml(SDXL))
    cfg = _build(imp)
    ds = cfg.dataset
    assert ds.train_data_dir is None and len(ds.subsets) == 2
    assert (
        ds.resolution == 1024 and (ds.min_bucket_reso, ds.max_bucket_reso) == (512, 2048) and ds.enable_bucket
    )
    assert ds.shuffle_caption and ds.keep_tokens == 1 and ds.caption_extension == ".txt"  # from [general]
    paint, sketch = ds.subsets
    assert (paint.image_dir, paint.num_repeats, paint.class_tokens) == (
        Path("data/zkz_style/paintings"),
        10,
        "zkz style, painting",
    )
    assert sketch.num_repeats == 5 and sketch.flip_aug is True and paint.flip_aug is None
    assert cfg.training.train_batch_size == 2 and cfg.dataset.max_token_length == 225
    assert cfg.network.network_train_unet_only and (cfg.network.conv_dim, cfg.network.conv_alpha) == (8, 4.0)
    assert (
        cfg.optimizer.optimizer_type == "Adafactor" and cfg.optimizer.weight_decay == 0.0
    )  # Adafactor's own
    assert cfg.loss.min_snr_gamma == 5 and cfg.loss.noise_offset == 0.0357
    assert cfg.loss.huber_c is None  # kohya's default huber_c with loss_type l2 is a no-op, not a warning


def test_refused_keys_are_named_with_their_reasons_in_one_error(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(
        'pretrained_model_name_or_path = "sd15-tiny"\ntrain_data_dir = "d"\nv2 = true\ncolor_aug = true\n'
        'optimizer_type = "SGDNesterov"\nnetwork_args = ["conv_dim=4", "rank_dropout=0.1"]\nmy_own_key = 1\n'
        "ip_noise_gamma = 0.1\n"
    )
    with pytest.raises(ConfigError) as info:
        import_kohya_file(path)
    message = str(info.value)
    assert "6 kohya setting(s)" in message
    for needle in (
        "v2 = True: SD 2.x bases are not supported",
        "color_aug = True: color augmentation is not implemented",
        "optimizer_type = 'SGDNesterov': not supported",
        "network_args.rank_dropout",
        "my_own_key = 1: unknown kohya key",
        "ip_noise_gamma = 0.1",
    ):
        assert needle in message, needle


def test_off_values_of_refused_keys_are_accepted():
    imp = convert_flat(
        {
            "pretrained_model_name_or_path": "x",
            "train_data_dir": "d",
            "v2": False,
            "color_aug": False,
            "huber_scale": 1,
            "lr_scheduler_args": [],
        }
    )
    assert not imp.refused
    assert all(r.detail == "off" for r in imp.rows if r.key in ("v2", "color_aug"))


def test_kohya_defaults_where_they_differ_from_ours():
    imp = convert_flat({"pretrained_model_name_or_path": "x", "train_data_dir": "d"})
    cfg = _build(imp)
    assert cfg.dataset.caption_extension == ".caption" and cfg.optimizer.learning_rate == 2e-6
    assert {r.key for r in imp.rows if r.action == "default"} == {"caption_extension", "learning_rate"}


def test_resolution_strings_and_text_encoder_lr_lists():
    base = {"pretrained_model_name_or_path": "x", "train_data_dir": "d"}
    assert _build(convert_flat({**base, "resolution": "768,512"})).dataset.resolution == (768, 512)
    assert _build(convert_flat({**base, "resolution": "512"})).dataset.resolution == 512
    assert _build(convert_flat({**base, "text_encoder_lr": [3e-5, 3e-5]})).optimizer.text_encoder_lr == 3e-5
    assert convert_flat({**base, "text_encoder_lr": [3e-5, 1e-5]}).refused


def test_dataset_config_precedence(tmp_path):
    """kohya: subset > [[datasets]] > [general] > command line; here the same values come out."""
    (tmp_path / "ds.toml").write_text(
        "[general]\nkeep_tokens = 2\nshuffle_caption = true\n\n[[datasets]]\nresolution = [512, 768]\n"
        "batch_size = 3\nkeep_tokens = 3\n\n  [[datasets.subsets]]\n  image_dir = 'a'\n  keep_tokens = 4\n"
        "  is_reg = true\n\n  [[datasets.subsets]]\n  image_dir = 'b'\n  num_repeats = 7\n\n"
        "[[datasets]]\nresolution = 256\n\n  [[datasets.subsets]]\n  image_dir = 'c'\n"
    )
    flat = {
        "pretrained_model_name_or_path": "x",
        "dataset_config": str(tmp_path / "ds.toml"),
        "keep_tokens": 1,
        "shuffle_caption": False,
        "train_data_dir": "ignored",
    }
    imp = convert_flat(flat)
    cfg = _build(imp)
    ds = cfg.dataset
    assert ds.train_data_dir is None and ds.shuffle_caption and ds.keep_tokens == 2  # [general] over flags
    a, b, c = ds.subsets
    assert (a.keep_tokens, a.is_reg, a.resolution) == (4, True, (512, 768))
    assert (b.keep_tokens, b.num_repeats, b.resolution) == (3, 7, (512, 768))
    assert (c.keep_tokens, c.resolution) == (None, 256)  # None: [dataset]'s 2
    assert cfg.training.train_batch_size == 3 and ds.caption_extension == ".caption"
    assert any(r.key == "train_data_dir" and "dataset_config is set" in r.detail for r in imp.rows)


def test_dataset_config_refusals(tmp_path):
    (tmp_path / "ds.toml").write_text(
        "[general]\ncolor_aug = true\n\n[[datasets]]\nbatch_size = 2\n\n  [[datasets.subsets]]\n"
        "  metadata_file = 'm.json'\n  image_dir = 'a'\n\n[[datasets]]\nbatch_size = 4\n"
        "  [[datasets.subsets]]\n  image_dir = 'b'\n  caption_prefix = 'x'\n"
    )
    imp = convert_flat({"pretrained_model_name_or_path": "x", "dataset_config": str(tmp_path / "ds.toml")})
    refused = {r.key for r in imp.refused}
    assert refused == {
        "general.color_aug",
        "datasets[0].subsets[0].metadata_file",
        "datasets[1].subsets[0].caption_prefix",
        "batch_size",
    }


def test_kohya_flags_on_the_command_line(train_overrides, tmp_path, capsys):
    over = train_overrides()
    argv = [
        "train",
        "--dry-run",
        "--pretrained_model_name_or_path",
        "world-random",
        "--train_data_dir",
        over["dataset.train_data_dir"],
        "--resolution",
        "64,64",
        "--network_module",
        "networks.lora",
        "--network_args",
        "conv_dim=4",
        "conv_alpha=2",
        "--save_precision",
        "fp16",
        "--save_model_as",
        "safetensors",
        "--max_token_length",
        "150",
        "--xformers",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "conv_dim = 4" in out and 'save_precision = "fp16"' in out and "max_token_length = 150" in out
    assert "xformers: no effect here" in err
    assert main([*argv, "--v2"]) == 2
    assert "v2 = True: SD 2.x bases are not supported" in capsys.readouterr().err
    assert main([*argv[:-2], "--save_model_as", "ckpt"]) == 2
    assert "Python pickle" in capsys.readouterr().err


def test_config_import_writes_an_equivalent_lorafuse_config(in_repo, tmp_path, capsys):
    out = tmp_path / "ours.toml"
    assert main(["config", "import", str(SDXL), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "kohya key" in table and "network_args.conv_dim" in table and "xformers" in table
    cfg, imp = load_train_config_any(SDXL)
    assert imp is not None and load_train_config(out) == cfg


def test_readme_lists_every_kohya_key():
    from lorafuse.train.kohya_keys import markdown_table

    readme = (REPO / "README.md").read_text()
    assert "## Coming from kohya" in readme
    assert markdown_table() in readme, (
        "README's kohya table is stale: paste kohya_keys.markdown_table() output"
    )
    from lorafuse.train import kohya_dataset, kohya_keys

    for line in (kohya_keys.summary(), kohya_dataset.summary()):
        assert line in readme, f"README's kohya counts are stale: {line}"


def test_flux_train_network_keys():
    """kohya's flux_train_network.py options: the loss and guidance keys map, the block selection of
    networks.lora_flux becomes network.layers, the separate component files map to model.ae / clip_l / t5xxl, the
    T5 mask is refused."""
    base = {"pretrained_model_name_or_path": "flux-tiny", "train_data_dir": "d"}
    flux = {
        "network_module": "networks.lora_flux", "network_train_unet_only": True,
        "timestep_sampling": "shift", "discrete_flow_shift": 3.1582, "sigmoid_scale": 1.0,
        "model_prediction_type": "raw", "guidance_scale": 1.0, "t5xxl_max_token_length": 256,
        "weighting_scheme": "none", "blocks_to_swap": 18, "cpu_offload_checkpointing": True,
        "network_args": ["train_blocks=single", "train_single_block_indices=0,2-3"],
    }  # fmt: skip
    imp = convert_flat({**base, **flux})
    assert not imp.refused
    _covered(imp, {**base, **flux})
    cfg = _build(imp)
    assert cfg.network.network_module == "networks.lora" and cfg.network.network_train_unet_only
    assert (cfg.loss.timestep_sampling, cfg.loss.discrete_flow_shift, cfg.loss.model_prediction_type) == (
        "shift", 3.1582, "raw",
    )  # fmt: skip
    assert cfg.model.guidance_scale == 1.0 and cfg.dataset.t5xxl_max_token_length == 256
    assert cfg.network.layers == (r"^single_transformer_blocks\.(0|2|3)\.",)
    both = convert_flat({**base, "network_args": ["train_double_block_indices=1", "train_single_block_indices=none"]})
    assert _build(both).network.layers == (r"^transformer_blocks\.(1)\.",)
    assert _build(convert_flat({**base, "network_args": ["train_blocks=double"]})).network.layers == "double"

    parts = {"pretrained_model_name_or_path": "flux1-dev.safetensors", "ae": "ae.safetensors",
             "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}  # fmt: skip
    model = _build(convert_flat({**base, **parts})).model
    assert (model.ae, model.clip_l, model.t5xxl) == ("ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors")
    assert model.part_files == {k: v for k, v in parts.items() if k != "pretrained_model_name_or_path"}

    refused = convert_flat({**base, "apply_t5_attn_mask": True,
                            "network_args": ["train_blocks=middle", "train_t5xxl=True"]})  # fmt: skip
    reasons = {row.key.split(".")[0]: row.detail for row in refused.refused}
    assert "no text attention mask" in reasons["apply_t5_attn_mask"]
    details = " | ".join(row.detail for row in refused.refused)
    assert "train_blocks must be all, double or single" in details and "T5-XXL LoRAs are not trained" in details


def test_flux_config_import_keeps_the_separate_files(in_repo, tmp_path, capsys):
    """kohya's four FLUX.1 files survive `config import` and the TOML round trip as model.ae / clip_l / t5xxl."""
    example = REPO / "examples" / "kohya" / "flux_lora.toml"
    out = tmp_path / "flux.toml"
    assert main(["config", "import", str(example), "--out", str(out)]) == 0
    assert "model.t5xxl" in capsys.readouterr().out
    cfg, imp = load_train_config_any(example)
    assert imp is not None and load_train_config(out) == cfg
    assert cfg.model.part_files == {"ae": "/models/ae.safetensors", "clip_l": "/models/clip_l.safetensors",
                                    "t5xxl": "/models/t5xxl_fp16.safetensors"}  # fmt: skip
