"""The memory estimate against measurements: activations saved for backward (a real forward on the
CPU), model states of one process (`parallel.model_state_memory`), big models traced without
allocating, `largest_micro_batch` and `linscale estimate-memory`. Several processes:
tests/dist/test_memory_estimate.py."""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from linscale.cli import main
from linscale.config import OptimConfig
from linscale.data import digits
from linscale.models.gpt import GPT, GPTConfig
from linscale.models.vit import ViT, ViTConfig
from linscale.perf import memory
from linscale.perf.memory import estimate, largest_micro_batch, trace
from linscale.runtime.device import Device
from linscale.runtime.parallel import checkpoint_blocks, model_state_memory
from linscale.task import DataShard, Task
from linscale.tasks.gpt import GPTTask, GPTTaskConfig
from linscale.tasks.image import ImageTask, ImageTaskConfig
from linscale.train.loop import count_flops_per_sample
from linscale.train.optim import build_optimizer
from linscale.train.precision import Precision

CPU = Device("cpu", 0, "gloo", "cpu", 1)
GPT_SMALL = dict(n_layer=3, d_model=96, n_head=4, block_size=64, pos="rotary", tie_embeddings=False, dropout=0.1)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(digits.write_digits(tmp_path_factory.mktemp("data") / "digits"))


@pytest.fixture(scope="module")
def tasks(digits_dir):
    """The built-in models: the gpt task's tiny size and a small rotary shape (untied head, dropout,
    which takes the math attention kernel), the image task's ViT and ResNet tiny sizes."""
    return {
        "gpt-tiny": GPTTask(GPTTaskConfig(size="tiny")),
        "gpt-small": GPTTask(GPTTaskConfig(**GPT_SMALL)),
        "vit-tiny": ImageTask(ImageTaskConfig(data=digits_dir, size="vit:tiny")),
        "resnet-tiny": ImageTask(ImageTaskConfig(data=digits_dir, size="resnet:tiny")),
    }


@pytest.fixture(scope="module")
def traces(tasks):
    cache: dict = {}

    def get(name: str, precision: str):
        if (name, precision) not in cache:
            cache[name, precision] = trace(tasks[name], precision)
        return cache[name, precision]

    return get


def saved_bytes(task, precision: str, every: int, micro_batch: int) -> int:
    """Bytes a real forward on the CPU saves for backward: each storage once, without the model's
    parameters and buffers (BatchNorm saves its running statistics, which are model state)."""
    torch.manual_seed(0)
    model = task.build_model()
    checkpoint_blocks(task.blocks(model), every)
    state = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(t.untyped_storage())
        if key not in state:
            seen[key] = t.untyped_storage().nbytes()
        return t

    batch = task.example_batch(micro_batch)
    with Precision(precision, "cpu").autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss(model, batch)
    loss.backward()  # the saved tensors were real: backward runs
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", ["none", "full", "2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small", "vit-tiny", "resnet-tiny"])
def test_activations_match_the_bytes_a_real_forward_saves(tasks, traces, name, precision, checkpointing):
    tr = traces(name, precision)
    every = {"none": 0, "full": 1, "2": 2}[checkpointing]
    # 1 is traced; 5 is extrapolated from the traces at 2 and 3.
    for micro_batch in (1, 5):
        real = saved_bytes(tasks[name], precision, every, micro_batch)
        est = tr.activations(micro_batch, checkpointing)
        err = (est - real) / real
        print(f"{name} {precision} ckpt={checkpointing} mb={micro_batch}: {100 * err:+.2f}%")
        assert abs(err) < 0.05, f"estimated {est} bytes, measured {real} ({100 * err:+.2f}%)"
    # Checkpointing keeps less; every block keeps least.
    if checkpointing != "none":
        assert tr.activations(5, checkpointing) < tr.activations(5, "none")
    if checkpointing == "2":
        assert tr.activations(5, "full") < tr.activations(5, "2")


def measured_peak(task, precision: str, every: int, micro_batch: int) -> int:
    """The peak bytes of tensors in one steady-state training step on the CPU, as torch's MemTracker
    counts them (parameters, buffers, gradients, optimizer states, activations, temporaries)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = task.build_model()
    checkpoint_blocks(task.blocks(model), every)
    opt = build_optimizer(model, OptimConfig(), "cpu", "ddp")

    def step() -> None:
        batch = task.example_batch(micro_batch)  # held through backward, as train_step holds it
        with Precision(precision, "cpu").autocast():
            loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay, as DDP's buckets and accumulation keep them

    step()  # the optimizer states exist from the first step on
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    return sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())


@pytest.mark.parametrize(
    "precision, checkpointing", [("fp32", "none"), ("bf16-mixed", "none"), ("bf16-mixed", "full"), ("fp32", "2")]
)
@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small", "vit-tiny", "resnet-tiny"])
def test_the_peak_of_one_process_bounds_a_real_step_closely(tasks, traces, name, precision, checkpointing):
    real = measured_peak(tasks[name], precision, {"none": 0, "full": 1, "2": 2}[checkpointing], 5)
    e = estimate(traces(name, precision), "ddp", micro_batch=5, precision=precision,
                 activation_checkpointing=checkpointing)  # fmt: skip
    err = (e.peak - real) / real
    print(f"peak {name} {precision} ckpt={checkpointing} mb=5: {100 * err:+.2f}% ({e.peak_at})")
    # Exact where traced as it runs (no checkpointing); an upper bound with recomputation.
    assert -0.02 < err < (0.02 if checkpointing == "none" else 0.15), (e.peak, real, e.breakdown)


def test_bf16_mixed_saves_less_per_sample_but_keeps_the_weight_casts(traces):
    fp32, bf16 = traces("gpt-tiny", "fp32"), traces("gpt-tiny", "bf16-mixed")
    slope = lambda tr: tr.activations(3) - tr.activations(2)  # noqa: E731
    assert slope(bf16) < 0.8 * slope(fp32)
    # The per-micro-batch constant: autocast's bf16 copies of the weights that backward needs.
    constant = lambda tr: tr.activations(2) - slope(tr) * 2  # noqa: E731
    matrices = sum(p.numel() for p in GPTTask(GPTTaskConfig(size="tiny")).build_model().parameters() if p.ndim == 2)
    assert constant(bf16) >= 2 * matrices * 0.9 and constant(fp32) < constant(bf16)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("name", ["gpt-small", "resnet-tiny"])
def test_model_states_of_one_process_match_what_it_holds(tasks, traces, name, strategy):
    task = tasks[name]
    torch.manual_seed(0)
    model = task.build_model()
    opt = build_optimizer(model, OptimConfig(), "cpu", strategy)
    task.loss(model, task.example_batch(2)).backward()
    opt.step()
    held = model_state_memory(model, opt)
    est = estimate(traces(name, "fp32"), strategy, world=1)
    assert {"params": est.params, "grads": est.grads, "optimizer": est.optimizer} == held
    assert est.model_states == sum(held.values())


def test_flops_are_counted_like_the_training_loop_when_the_task_states_none():
    class Unstated(Task):
        def build_model(self):
            return GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, block_size=16))

        def example_batch(self, micro_batch):
            return torch.randint(0, 256, (micro_batch, 17))

        def train_data(self, shard):
            return torch.utils.data.TensorDataset(torch.randint(0, 256, (8, 17)))

        def loss(self, model, batch):
            return nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    task = Unstated()
    tr = trace(task)
    torch.manual_seed(0)
    data = [row for row in task.example_batch(4)]
    assert tr.flops_per_sample == count_flops_per_sample(task, task.build_model(), data, 4, CPU)
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=4, block_size=16)
    d, f, T = cfg.d_model, 4 * cfg.d_model, cfg.block_size
    assert tr.block_fwd_flops_per_sample == [T * (2 * d * (4 * d + 2 * f) + 4 * T * d)] * 2
    assert tr.other_fwd_flops_per_sample == 2 * T * d * cfg.vocab_size  # the head


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class Yuan(Task):
    """yuan-4.7b with its own vocabulary (53,005); the gpt task takes its vocabulary from the data."""

    tokens_per_sample = 2048

    def build_model(self):
        return GPT(GPTConfig.named("yuan-4.7b"))

    def example_batch(self, micro_batch):
        return torch.zeros(micro_batch, 2049, dtype=torch.int64)

    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())

    def train_data(self, shard):
        raise AssertionError("the estimate must not read data")


class ViTg(Task):
    def build_model(self):
        return ViT(ViTConfig.named("vit-g14"))

    def example_batch(self, micro_batch):
        return torch.zeros(micro_batch, 3, 224, 224), torch.zeros(micro_batch, dtype=torch.int64)

    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]).float(), batch[1])

    def train_data(self, shard):
        raise AssertionError("the estimate must not read data")


@pytest.mark.parametrize(
    "task, params, blocks", [(Yuan(), 4_694_283_264, 40), (ViTg(), 1_012_611_432, 40)], ids=["yuan-4.7b", "vit-g14"]
)
def test_big_models_trace_without_allocating_and_count_exactly(task, params, blocks):
    before = _rss_gib()
    t0 = time.perf_counter()
    tr = trace(task, "bf16-mixed")
    seconds = time.perf_counter() - t0
    print(f"traced {params:,} parameters in {seconds:.1f} s")
    assert tr.num_params == params and tr.num_blocks == blocks
    assert sum(tr.block_params) + sum(memory._numel(s) for s in tr.other_param_shapes) == params
    assert _rss_gib() - before < 1.0, "tracing allocated the model"  # fp32 weights alone: 4 or 19 GiB
    assert seconds < 60  # a few seconds on an idle laptop; generous for a busy CI machine
    e = estimate(tr, "zero3", world=8, micro_batch=1, precision="bf16-mixed")
    assert e.params == pytest.approx(4 * params / 8, rel=0.01)
    assert e.optimizer == pytest.approx(8 * params / 8, rel=0.01)
    assert e.peak == max(e.forward_peak, e.backward_peak, e.step_peak)


def test_the_builtin_tasks_build_their_named_sizes_on_meta_without_data(digits_dir):
    """`linscale estimate-memory gpt --task.size=yuan-4.7b` with no data: a byte vocabulary; the
    image task's vit-g14 on the digits: 10 classes (Yuan and ViTg above trace the same blocks)."""
    for task in (GPTTask(GPTTaskConfig(size="yuan-4.7b")), ImageTask(ImageTaskConfig(data=digits_dir, size="vit-g14"))):
        before = _rss_gib()
        model, blocks = memory._build(task)
        assert sum(p.numel() for p in model.parameters()) == task.model_cfg.num_params() and len(blocks) == 40
        assert _rss_gib() - before < 0.5
        batch = task.example_batch(2)
        assert (batch if isinstance(batch, torch.Tensor) else batch[0]).shape[0] == 2


def test_example_batches_look_like_the_loaders(tasks):
    gpt = GPTTask(GPTTaskConfig(size="tiny", corpus_mb=0.1))
    made, read = gpt.example_batch(3), Task.example_batch(gpt, 3)  # the default collates train_data
    assert made.shape == read.shape == (3, 129) and made.dtype == read.dtype
    image = tasks["vit-tiny"]
    (x, y), (rx, ry) = image.example_batch(3), Task.example_batch(image, 3)
    assert x.shape == rx.shape and x.dtype == rx.dtype and y.shape == ry.shape and y.dtype == ry.dtype


def test_default_example_batch_collates_the_first_samples():
    class Squares(Task):
        def train_data(self, shard):
            assert shard == DataShard(0, 1, 0)
            x = torch.arange(5.0).unsqueeze(1)
            return torch.utils.data.TensorDataset(x, 2 * x)

    x, y = Squares().example_batch(3)
    assert x.flatten().tolist() == [0.0, 1.0, 2.0] and y.flatten().tolist() == [0.0, 2.0, 4.0]


def test_a_loss_that_reads_values_is_refused_with_the_reason(digits_dir):
    task = ImageTask(ImageTaskConfig(data=digits_dir, size="vit:tiny", mixup=0.2))
    with pytest.raises(memory.TraceError, match="reads tensor values"):
        trace(task)


def test_sharding_follows_torch_chunk():
    for rows in (1, 3, 10, 64, 65):
        for parts in (1, 2, 3, 4, 8):
            chunks = torch.chunk(torch.empty(rows, 3), parts)
            want = [c.numel() for c in chunks] + [0] * (parts - len(chunks))
            assert [memory._chunk_numel((rows, 3), parts, r) for r in range(parts)] == want


def test_checkpointing_settings_name_the_blocks_parallel_wraps():
    assert memory.checkpointed_blocks("none", 4) == frozenset()
    assert memory.checkpointed_blocks("full", 3) == {0, 1, 2}
    assert memory.checkpointed_blocks("2", 5) == {0, 2, 4}
    with pytest.raises(ValueError, match="none, full or a positive integer"):
        memory.checkpointed_blocks("some", 4)


def test_strategies_order_by_memory_and_checks_name_the_fix(traces):
    tr = traces("gpt-tiny", "fp32")
    states = {s: estimate(tr, s, world=8, micro_batch=4).model_states for s in ("ddp", "zero1", "zero2", "zero3")}
    # zero2 and zero3 hold the same shards at rest; zero2 keeps every parameter gathered in between.
    assert states["ddp"] > states["zero1"] > states["zero2"] == states["zero3"]
    zero2, zero3 = estimate(tr, "zero2", world=8), estimate(tr, "zero3", world=8)
    assert zero2.temporaries > zero3.temporaries and zero2.peak > zero3.peak
    hsdp = estimate(tr, "hsdp", world=8, nodes=2)
    assert hsdp.params == estimate(tr, "zero3", world=4).params  # sharded within a node of 4
    with pytest.raises(ValueError, match="not divisible by 3 nodes"):
        estimate(tr, "hsdp", world=8, nodes=3)
    with pytest.raises(ValueError, match="unknown strategy 'zero4'"):
        estimate(tr, "zero4", world=8)
    with pytest.raises(ValueError, match="use bf16-mixed"):
        estimate(tr, "ddp", world=8, precision="bf16-true")
    with pytest.raises(ValueError, match="trace again"):
        estimate(tr, "ddp", world=8, precision="bf16-mixed")


def test_largest_micro_batch_is_the_largest_divisor_that_fits(traces):
    tr = traces("gpt-tiny", "fp32")
    peaks = {mb: estimate(tr, "ddp", 8, 1, mb).peak for mb in (1, 2, 3, 4, 6, 12)}
    assert all(peaks[a] < peaks[b] for a, b in zip((1, 2, 3, 4, 6), (2, 3, 4, 6, 12), strict=True))
    budget = (peaks[4] + peaks[6]) / 2
    kw = dict(world=8, nodes=1, precision="fp32", activation_checkpointing="none", per_replica=12)
    assert largest_micro_batch(tr, "ddp", device_memory=budget, reserve=0.0, **kw) == 4
    assert largest_micro_batch(tr, "ddp", device_memory=budget / 0.5, reserve=0.5, **kw) == 4
    assert largest_micro_batch(tr, "ddp", device_memory=peaks[12], reserve=0.0, **kw) == 12
    assert largest_micro_batch(tr, "ddp", device_memory=peaks[1] - 1, reserve=0.0, **kw) is None


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["estimate-memory", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


TINY = ["gpt", "--task.size=tiny", "--precision=fp32"]


def test_cli_prints_a_table_of_strategies_and_what_fits(capsys, traces):
    code, out, err = _cli(capsys, *TINY, "--world", "4", "--device-memory", "24MiB", "--micro-batch", "2")
    assert code == 0, err
    assert "842.50K parameters (842,496)" in out and "precision fp32" in out and "world 4" in out
    assert "micro-batch 2 of 8 samples per replica" in out
    lines = out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("ddp", "zero1", "zero2", "zero3")}
    assert set(rows) == {"ddp", "zero1", "zero2", "zero3"}
    assert all(r[-1] in ("yes", "no") for r in rows.values())
    assert any(line.startswith("largest micro-batch that fits") for line in lines)
    tr = traces("gpt-tiny", "fp32")
    for s in rows:
        e = estimate(tr, s, world=4, micro_batch=2)
        assert f"{e.peak / 2**30:.2f}" in rows[s]
        fits = largest_micro_batch(tr, s, 4, 1, "fp32", "none", 24 * 2**20, 8)
        assert f"  {s}: {fits if fits else 'none'}" in out


def test_cli_json_and_hsdp_across_nodes(capsys):
    code, out, err = _cli(capsys, *TINY, "--nodes", "2", "--json", "--activation-checkpointing", "full")
    assert code == 0, err
    data = json.loads(out)
    assert data["world"] == 16 and data["nodes"] == 2 and data["activation_checkpointing"] == "full"
    assert [e["strategy"] for e in data["estimates"]] == ["ddp", "zero1", "zero2", "zero3", "hsdp"]
    assert all(e["peak"] >= e["model_states"] + e["activations"] for e in data["estimates"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "zero4"], "unknown strategy 'zero4'; choose from ddp, zero1"),
        (["--world", "6", "--nodes", "4"], "--world 6 is not divisible by --nodes 4"),
        (["--device-memory", "lots"], "write for example 32GB"),
        (["--precision", "bf16-true", "--strategy", "ddp"], "use --precision bf16-mixed for ddp"),
        (["--activation-checkpointing", "some"], "none, full or a positive integer"),
        (["--micro-batch", "3"], "train.micro_batch=3 does not divide the 8 samples"),
        (["--task.size=huge"], "unknown task.size='huge'"),
    ],
)
def test_cli_errors_name_the_problem_and_the_fix(capsys, args, message):
    code, out, err = _cli(capsys, *TINY, "--world", "4", *args)
    assert code == 2 and message in err, err


def test_device_memory_sizes():
    from linscale.cli.estimate import parse_size

    assert parse_size("32GB") == 32e9 and parse_size("80GiB") == 80 * 2**30 and parse_size("24") == 24 * 2**30
    assert parse_size("512 MiB") == 2**29
