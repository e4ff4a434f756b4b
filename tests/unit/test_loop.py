"""Pieces of the training loop that need no process group."""

import pytest
import torch

from linscale.config import ConfigError, load_config, parse_overrides
from linscale.runtime.device import Device
from linscale.tasks.gpt import GPTTask, GPTTaskConfig, TokenWindows
from linscale.train.loop import count_flops_per_sample, make_task, plan_run

CPU = Device("cpu", 0, "gloo", "cpu", 1)


def test_counted_flops_include_attention_and_match_the_model_formula():
    task = GPTTask(GPTTaskConfig(n_layer=2, d_model=32, n_head=4, block_size=16))
    torch.manual_seed(0)
    model = task.build_model()
    data = TokenWindows(torch.randint(0, 256, (16 * 10 + 1,), dtype=torch.uint8).numpy(), 16)
    counted = count_flops_per_sample(task, model, data, micro_batch=4, device=CPU)
    assert counted == task.flops_per_sample()
    assert all(p.grad is None for p in model.parameters()), "counting must leave no gradients behind"


def test_override_value_cannot_be_the_next_option():
    with pytest.raises(ConfigError, match="--log.dir needs a value"):
        parse_overrides(["--log.dir", "--train.max_steps=3"])


def _cfg(**train):
    return load_config(None, {"train": {k: str(v) for k, v in train.items()}}, GPTTaskConfig)


def test_plan_run_derives_steps_from_tokens_and_checks_the_schedule():
    task = make_task(GPTTask, _cfg(max_tokens=10_000, global_batch=8))
    plan, steps = plan_run(task, _cfg(max_tokens=10_000, global_batch=8), replicas=2)
    assert (plan.micro_batch, plan.accum_steps) == (4, 1)
    assert steps == -(-10_000 // (8 * 128))
    both = _cfg(max_tokens=10_000, max_steps=3, global_batch=8)
    assert plan_run(task, both, 2)[1] == 3
    with pytest.raises(ValueError, match="optim.schedule=constant"):
        plan_run(task, _cfg(max_time=5, global_batch=8), 2)
    tokens = _cfg(global_batch_tokens=1024, max_steps=1)
    assert plan_run(task, tokens, 1)[0].global_batch == 8


def test_help_lists_every_field_with_the_value_in_effect():
    from linscale.config import TrainConfig, describe

    cfg = load_config(None, {"train": {"max_steps": "7"}}, GPTTaskConfig, GPTTask.defaults)
    lines = describe(cfg.train, "train")
    assert len(lines) == len(TrainConfig.__dataclass_fields__)
    assert any(line.split()[0] == "--train.max_steps=7" for line in lines)
    assert any(line.split()[0] == "--train.eval_every=250" for line in lines)  # the task's default
    assert describe(TrainConfig, "train")[0].split()[0] == "--train.global_batch=32"


def test_activation_checkpointing_wraps_every_kth_block_and_keeps_results():
    from torch import nn

    from linscale.runtime.parallel import checkpoint_blocks

    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(5))
    x = torch.randn(4, 8, requires_grad=True)

    def grads():
        for p in blocks.parameters():
            p.grad = None
        h = x
        for b in blocks:
            h = b(h)
        h.sum().backward()
        return [p.grad.clone() for p in blocks.parameters()]

    before = grads()
    names = [n for n, _ in blocks.named_parameters()]
    assert checkpoint_blocks(list(blocks), 2) == 3  # blocks 0, 2 and 4
    assert [n for n, _ in blocks.named_parameters()] == names  # state dicts unchanged
    for a, b in zip(before, grads(), strict=True):
        torch.testing.assert_close(a, b)
    assert checkpoint_blocks(list(blocks), 0) == 0


def test_target_loss_needs_periodic_evaluation():
    from linscale.config import TrainConfig

    with pytest.raises(ConfigError, match=r"train.target_loss=2.0 .* set train.eval_every=N"):
        TrainConfig(max_steps=5, target_loss=2.0)
    with pytest.raises(ConfigError, match="train.target_loss must be >= 0"):
        TrainConfig(max_steps=5, eval_every=1, target_loss=-1.0)
    assert TrainConfig(max_steps=5, eval_every=10, target_loss=2.0).target_loss == 2.0


def test_target_loss_needs_a_task_with_eval_data():
    from linscale.task import Task

    class NoEval(Task):
        def build_model(self):
            return torch.nn.Linear(1, 1)

        def train_data(self, shard):
            return torch.utils.data.TensorDataset(torch.zeros(8, 1))

        def loss(self, model, batch):
            return model(batch[0]).mean()

    cfg = load_config(None, {"train": {"max_steps": "3", "eval_every": "1", "target_loss": "0.5"}}, None)
    with pytest.raises(ConfigError, match="this task has no eval_data; define eval_data"):
        plan_run(NoEval(), cfg, replicas=1)
    gpt = load_config(None, {"train": {"max_steps": "3", "eval_every": "1", "target_loss": "0.5"}}, GPTTaskConfig)
    assert plan_run(make_task(GPTTask, gpt), gpt, replicas=1)[1] == 3


def test_perplexity_and_missing_values_in_the_summary():
    import math

    from linscale.train.metrics import format_summary, perplexity

    assert perplexity(math.log(256)) == pytest.approx(256)
    assert perplexity(1e6) == math.inf
    text = format_summary({"steps_to_target": None, "time_to_target": 83.456, "target_reached": False})
    assert "steps_to_target = n/a" in text and "time_to_target  = 0:01:23.46" in text


def test_auto_loader_workers_follow_the_device_and_the_data():
    from linscale.train.loop import _loader_workers

    cpu, gpu = Device("cpu", 0, "gloo", "cpu", 2), Device("cuda", 0, "nccl", "gpu", 16)
    small_gpu_host = Device("cuda", 0, "nccl", "gpu", 2)

    class Decoding(torch.utils.data.Dataset):
        decodes = True

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    plain = torch.utils.data.TensorDataset(torch.zeros(4))
    assert _loader_workers(-1, cpu, plain) == 0
    assert _loader_workers(-1, cpu, Decoding()) == 1
    assert _loader_workers(-1, gpu, plain) == 4 and _loader_workers(-1, small_gpu_host, plain) == 1
    assert _loader_workers(-1, gpu, Stream()) == 1  # more would read the stream once per worker
    assert _loader_workers(3, cpu, plain) == 3  # a setting is kept


def test_auto_micro_batch_is_the_largest_divisor_that_fits_and_keeps_the_global_batch():
    from dataclasses import replace

    from linscale.config import load_config
    from linscale.perf.memory import estimate, trace
    from linscale.runtime.device import CPU
    from linscale.runtime.topology import Topology
    from linscale.tasks.gpt import GPTTask
    from linscale.train.loop import auto_micro_batch, make_task, plan_run
    from linscale.train.precision import resolve_precision

    over = {"train": {"global_batch": "16", "micro_batch": "auto", "max_steps": "1"},
            "task": {"n_layer": "2", "d_model": "64", "n_head": "4", "block_size": "32", "corpus_mb": "0.5"},
            "runtime": {"precision": "fp32"}}  # fmt: skip
    cfg = load_config(None, over, GPTTask.Config, GPTTask.defaults)
    task = make_task(GPTTask, cfg)
    plan, _ = plan_run(task, cfg, 1)
    assert plan.micro_batch == 16  # the whole share until the run decides
    tr = trace(task, "fp32")
    peak = {mb: estimate(tr, "ddp", 1, 1, mb, "fp32").peak for mb in (4, 8)}
    device = replace(CPU, threads=1)
    # A device of memory between the peaks of micro-batch 4 and 8 (10% kept in reserve).
    memory = (peak[4] + peak[8]) / 2 / 0.9
    device.total_memory = lambda local=1: memory  # type: ignore[method-assign]
    precision = resolve_precision("fp32", device)
    micro, note = auto_micro_batch(GPTTask, task, None, None, cfg, plan, "ddp", precision, device, Topology())
    assert micro == 4 and "accumulation 4" in note
    device.total_memory = lambda local=1: peak[4] / 10  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="does not fit"):
        auto_micro_batch(GPTTask, task, None, None, cfg, plan, "ddp", precision, device, Topology())
