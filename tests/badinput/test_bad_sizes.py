"""Train settings whose size drives an allocation or a loop (resolution, rank, batch, steps...): an absurd value is
one error at config time naming the key, the value and the limit (a 10^9 resolution used to pass the dry run and
end the run in a MemoryError traceback). And config errors say where the value came from: the file, or the
command line, not a list of every option given."""

from __future__ import annotations

import pytest

from lorafuse.errors import ConfigError, UserInputError
from lorafuse.train import config_limits as lim

TRAIN = ["train", "--dry-run", "--pretrained_model_name_or_path", "world-random"]

BIG = [
    (["--resolution", "1000000000"], "dataset.resolution", "1000000000", lim.MAX_SIDE),
    (["--resolution", "512,1000000000"], "dataset.resolution", "1000000000", lim.MAX_SIDE),
    (["--enable_bucket", "--max_bucket_reso", "100032"], "dataset.max_bucket_reso", "100032", lim.MAX_SIDE),
    (["--max_bucket_reso", "100000"], "dataset.max_bucket_reso", "100000", lim.MAX_SIDE),  # buckets off too
    (["--bucket_reso_steps", "16384"], "dataset.bucket_reso_steps", "16384", lim.MAX_SIDE),
    (["--t5xxl_max_token_length", "100000"], "dataset.t5xxl_max_token_length", "100000", lim.MAX_T5_TOKENS),
    (["--clip_skip", "1000"], "model.clip_skip", "1000", lim.MAX_CLIP_SKIP),
    (["--network_dim", "100000"], "network.network_dim", "100000", lim.MAX_RANK),
    (["--conv_dim", "5000"], "network.conv_dim", "5000", lim.MAX_RANK),
    (["--block_dims", "4", "99999"], "network.block_dims", "99999", lim.MAX_RANK),
    (["--train_batch_size", "100000"], "training.train_batch_size", "100000", lim.MAX_BATCH),
    (["--sample_steps", "5000"], "training.sample_steps", "5000", lim.MAX_SAMPLE_STEPS),
    (["--gradient_checkpointing", "--blocks_to_swap", str(10**18)], "training.blocks_to_swap", str(10**18),
     lim.MAX_BLOCKS_TO_SWAP),
    (["--max_train_steps", "1000000000"], "training.max_train_steps", "1000000000", lim.MAX_STEPS),
    (["--max_train_epochs", "10000000"], "training.max_train_epochs", "10000000", lim.MAX_EPOCHS),
]


@pytest.mark.parametrize(("extra", "key", "value", "limit"), BIG, ids=[b[1] + ":" + b[2] for b in BIG])
def test_absurd_size_is_refused_at_config_time(cli, tmp_path, data, no_model, extra, key, value, limit):
    msg = cli.refused([*TRAIN, "--train_data_dir", data, "--output_dir", tmp_path / "out", *extra],
                      f"{key}: {value} is larger than", f"(limit {limit})", watch=tmp_path)  # fmt: skip
    # no file: the message starts with the key (it names the option), not "<defaults> with overrides A, B, ..."
    assert msg.startswith(f"lorafuse train: error: {key}: "), msg


def test_limits_themselves_are_accepted():
    """The bounds are inclusive: a run at the limit is allowed (only beyond it is absurd)."""
    from lorafuse.config.toml_io import config_from_dict
    from lorafuse.train.config import TrainConfig

    cfg = config_from_dict(TrainConfig, {
        "model": {"pretrained_model_name_or_path": "w", "clip_skip": lim.MAX_CLIP_SKIP},
        "dataset": {"train_data_dir": "d", "resolution": lim.MAX_SIDE, "t5xxl_max_token_length": lim.MAX_T5_TOKENS},
        "network": {"network_dim": lim.MAX_RANK},
        "training": {"train_batch_size": lim.MAX_BATCH, "blocks_to_swap": lim.MAX_BLOCKS_TO_SWAP,
                     "gradient_checkpointing": True, "sample_steps": lim.MAX_SAMPLE_STEPS,
                     "max_train_steps": lim.MAX_STEPS, "max_train_epochs": lim.MAX_EPOCHS},
    })  # fmt: skip
    assert cfg.dataset.size == (lim.MAX_SIDE, lim.MAX_SIDE)


def test_lokr_full_matrix_dim_is_not_a_rank():
    """LyCORIS's LoKr reads a dim past half a factor's side as "full matrix"; the kohya_ss GUI writes 100000."""
    from lorafuse.train.config import NetworkConfig

    net = NetworkConfig(network_module="lycoris.kohya", algo="lokr", network_dim=100000, conv_dim=100000)
    assert net.conv_dim == 100000
    with pytest.raises(ConfigError, match=r"conv_dim: 100000 is larger than the widest layer"):
        NetworkConfig(network_module="lycoris.kohya", algo="loha", conv_dim=100000)


def test_limits_follow_the_bases():
    """The side limit is 8x the largest base's default size, and the rank limit covers the widest layer a LoRA
    trains (FLUX.1's attention width): if a larger base is added, these fail instead of the limit refusing it."""
    from lorafuse.families import flux
    from lorafuse.families.registry import FAMILIES

    assert lim.MAX_SIDE == 8 * max(f.default_resolution for f in FAMILIES.values())
    width = flux.TRANSFORMER["num_attention_heads"] * flux.TRANSFORMER["attention_head_dim"]
    assert width <= lim.MAX_RANK < 2 * width
    from lorafuse.train.block_swap import swap_counts

    swap_counts(lim.MAX_BLOCKS_TO_SWAP, flux.TRANSFORMER["num_layers"], flux.TRANSFORMER["num_single_layers"])
    with pytest.raises(UserInputError, match=f"at most {lim.MAX_BLOCKS_TO_SWAP}"):
        swap_counts(lim.MAX_BLOCKS_TO_SWAP + 1, flux.TRANSFORMER["num_layers"], flux.TRANSFORMER["num_single_layers"])


def test_subset_resolution_in_a_file_names_the_file(cli, tmp_path, data, no_model):
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\npretrained_model_name_or_path = "world-random"\n[dataset]\n'
                    f'[[dataset.subsets]]\nimage_dir = "{data / "1_sks dog"}"\nresolution = [512, 70000]\n')  # fmt: skip
    msg = cli.refused(["train", path, "--dry-run"], "dataset.subsets[0].resolution: 70000 is larger than",
                      f"(limit {lim.MAX_SIDE})", watch=tmp_path)  # fmt: skip
    assert msg.startswith(f"lorafuse train: error: {path}: "), msg


def test_message_names_where_the_value_came_from(cli, tmp_path, data, no_model):
    """A file's value: the file; an option over a file: 'command line'; never the list of every option."""
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\npretrained_model_name_or_path = "world-random"\n[dataset]\ntrain_data_dir = "{data}"\n'
                    f'resolution = 100000\n[training]\noutput_dir = "{tmp_path / "out"}"\n')  # fmt: skip
    from_file = cli.refused(["train", path, "--dry-run", "--network_dim", "8", "--seed", "3"],
                            f"{path}: dataset.resolution: 100000", watch=tmp_path)  # fmt: skip
    assert "network_dim" not in from_file and "overrides" not in from_file, from_file
    from_cli = cli.refused(["train", path, "--dry-run", "--resolution", "512", "--network_dim", "0"],
                           "error: command line: network.network_dim: must be positive, got 0", watch=tmp_path)  # fmt: skip
    assert str(path) not in from_cli and "resolution" not in from_cli, from_cli


@pytest.mark.parametrize("alloc", ["torch", "python"])
def test_running_out_of_memory_is_one_error(cli, tmp_path, data, monkeypatch, alloc):
    """Below the limits a run can still exceed this machine (on a CPU no estimate runs first): torch's allocator
    error or Python's MemoryError is one line naming the options, the size tried and what to change."""
    import torch

    import lorafuse.train.loop as loop

    def train_lora(*a, **k):
        return torch.empty(2**50, dtype=torch.uint8) if alloc == "torch" else bytearray(2**60)

    monkeypatch.setattr(loop, "train_lora", train_lora)
    argv = ["train", "--pretrained_model_name_or_path", "world-random", "--train_data_dir", data, "--output_dir",
            tmp_path / "out", "--no-progress"]  # fmt: skip
    tried = ["(it tried to allocate 1048576.00 GiB at once)"] if alloc == "torch" else []
    cli.refused(argv, "command-line options: the run ran out of memory", *tried, "lorafuse train --estimate",
                "dataset.resolution")  # fmt: skip


def test_out_of_memory_reads_cuda_and_leaves_other_errors():
    from lorafuse.cli.train import out_of_memory

    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB")
    assert "(it tried to allocate 2.00 GiB at once)" in str(out_of_memory(cuda, None))
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None) is None


def test_clip_skip_past_this_bases_encoder_is_refused_once_it_loads(cli, tmp_path, data):
    """The config's limit is the deepest encoder of any base; the base's own depth is checked as it loads, before
    any cache or step (one past it trained on the token embeddings alone, without a word; further past, an
    IndexError inside the first step). The largest usable value still trains."""
    from lorafuse.models.load import load_base_pipeline

    layers = load_base_pipeline("world-random").text_encoder.config.num_hidden_layers
    run = [*TRAIN[:1], *TRAIN[2:], "--train_data_dir", str(data), "--resolution", "32", "--max_train_steps", "1",
           "--no-progress", "--output_dir"]  # fmt: skip
    message = cli.refused([*run, tmp_path / "deep", "--clip_skip", str(layers + 1)], "model.clip_skip",
                          f"{layers + 1} skips every layer", f"give at most {layers}")  # fmt: skip
    assert "Traceback" not in message
    assert cli(*run, tmp_path / "ok", "--clip_skip", str(layers))[0] == 0
