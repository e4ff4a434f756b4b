"""Strategy choice and model-state arithmetic, without processes."""

import pytest

from linscale.config import ConfigError, ParallelConfig
from linscale.runtime.parallel import choose_strategy, describe_communication, model_state_bytes

GIB = 2**30


def test_model_state_bytes_follow_what_each_strategy_shards():
    p = 1_000_000
    assert model_state_bytes(p, 4, "ddp") == 16 * p
    assert model_state_bytes(p, 4, "zero1") == 8 * p + 8 * p / 4
    assert model_state_bytes(p, 4, "zero2") == 4 * p + 12 * p / 4
    assert model_state_bytes(p, 4, "zero3") == 16 * p / 4


def test_auto_picks_the_simplest_strategy_that_fits_and_says_why():
    # A 1B-parameter model: 16 GB of model states when replicated.
    p = 1_000_000_000
    assert choose_strategy(p, 8, 80 * GIB).strategy == "ddp"  # 16 GB <= 40 GiB
    assert choose_strategy(p, 8, 24 * GIB).strategy == "zero1"  # 9 GB <= 12 GiB, 16 GB is not
    assert choose_strategy(p, 8, 16 * GIB).strategy == "zero2"  # 5.5 GB <= 8 GiB
    choice = choose_strategy(p, 8, 8 * GIB)
    assert choice.strategy == "zero3" and "GiB" in choice.reason
    too_big = choose_strategy(100 * p, 8, 8 * GIB)
    assert too_big.strategy == "zero3" and "add devices" in too_big.reason
    assert choose_strategy(p, 1, 1 * GIB).strategy == "ddp"  # one process: nothing to shard


@pytest.mark.parametrize(("value", "every"), [("none", 0), ("full", 1), ("3", 3)])
def test_activation_checkpointing_setting(value, every):
    assert ParallelConfig(activation_checkpointing=value).checkpoint_every == every


@pytest.mark.parametrize("value", ["0", "-1", "some", "1.5"])
def test_activation_checkpointing_rejects_bad_values(value):
    with pytest.raises(ConfigError, match="none, full or a positive integer"):
        ParallelConfig(activation_checkpointing=value)


def test_the_summary_says_what_each_strategy_sends():
    base = ParallelConfig()
    assert describe_communication("ddp", base, 1) == "none (one process)"
    assert "all-reduce in 25 MiB buckets" in describe_communication("ddp", base, 2)
    assert describe_communication("ddp", base, 2).endswith("fp32")
    assert "compressed to bf16" in describe_communication("ddp", ParallelConfig(comm_hook="bf16"), 2)
    psgd = ParallelConfig(comm_hook="powersgd", powersgd_rank=4, powersgd_warmup=7)
    assert "PowerSGD rank 4 after 7 exact steps" in describe_communication("ddp", psgd, 2)
    assert "parameter broadcast" in describe_communication("zero1", base, 2)
    assert "in forward," in describe_communication("zero2", base, 2)
    assert "forward and backward" in describe_communication("zero3", base, 2)
    hsdp = describe_communication("hsdp", ParallelConfig(reduce_dtype="bf16"), 4, nodes=2)
    assert "reduce-scatter in bf16 inside each node" in hsdp and "across the 2 nodes" in hsdp
