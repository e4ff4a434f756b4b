"""The user contract: what a task supplies, and how a task is found by name.

A task is a small class. linscale calls, on every process:

    task = MyTask(config)                 # config: an instance of MyTask.Config, or None
    model = task.build_model()            # a plain nn.Module, on the CPU
    data = task.train_data(shard)         # a map-style Dataset (linscale shards it)
                                          # or an IterableDataset that reads shard.rank/size
    loss = task.loss(model, batch)        # a scalar: the mean loss of the batch

and, when defined, `eval_data(shard)`, `eval_step(model, batch)`, `flops_per_sample()`, `tokens_per_sample`,
`example_batch(micro_batch)` (a batch made without reading data, for the memory estimate) and
`final_report(model)`. A task never touches ranks, devices or process groups beyond the
`DataShard` it is given.

Tasks are named as a built-in (`gpt`, `image`), a file (`path/to/my_task.py:MyTask`) or a module
(`pkg.mod:MyTask`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: the CLI resolves tasks before torch is imported
    import torch
    from torch import nn

BUILTIN_TASKS = {"gpt": "linscale.tasks.gpt:GPTTask", "image": "linscale.tasks.image:ImageTask"}


class TaskError(ValueError):
    """A task that cannot be found or does not follow the contract."""


@dataclass(frozen=True)
class DataShard:
    """Which part of the data one data-parallel replica reads."""

    rank: int
    size: int
    seed: int
    #: The run directory, where a task may write reports (None outside a training run).
    run_dir: str | None = None


class Task:
    """Base class of tasks. Override `build_model`, `train_data` and `loss`.

    Example:
        class Squares(Task):
            def build_model(self):
                return nn.Linear(1, 1)
            def train_data(self, shard):
                x = torch.arange(64.0).unsqueeze(1)
                return torch.utils.data.TensorDataset(x, 2 * x)
            def loss(self, model, batch):
                x, y = batch
                return nn.functional.mse_loss(model(x), y)
    """

    #: A dataclass describing the task's own `[task]` settings, or None.
    Config: ClassVar[type | None] = None
    #: Default settings of other sections, for example {"train": {"global_batch": 64}}.
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Tokens in one sample, for token-based batch sizes and tokens/s (None: not a token task).
    tokens_per_sample: int | None = None

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_data(self, shard: DataShard) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def eval_data(self, shard: DataShard) -> torch.utils.data.Dataset | None:
        """Held-out data, evaluated with `loss`; None means no evaluation."""
        return None

    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Metrics of one evaluation batch, each the mean over the batch; "loss" is required.

        linscale averages each over the whole evaluation set (weighted by batch size, across
        replicas) and reports it as eval_<name>. By default only the loss."""
        return {"loss": self.loss(model, batch)}

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's repeated blocks, which sharding and activation checkpointing treat as units.

        By default the modules in `model.blocks` (an nn.ModuleList), or none."""
        return list(getattr(model, "blocks", []))

    def example_batch(self, micro_batch: int) -> Any:
        """A batch of `micro_batch` samples shaped like the training loader's, for tracing the model
        (`linscale estimate-memory`); its values do not matter.

        By default the first samples of `train_data`, collated; a task whose data is large or
        absent returns tensors of the right shapes and dtypes instead."""
        import itertools

        import torch.utils.data

        data = self.train_data(DataShard(0, 1, 0))
        if isinstance(data, torch.utils.data.IterableDataset):
            samples = list(itertools.islice(iter(data), micro_batch))
        else:
            samples = [data[i] for i in range(min(micro_batch, len(data)))]
        if not samples:
            raise TaskError(f"{type(self).__name__}.train_data is empty; define example_batch(micro_batch) instead")
        return torch.utils.data.default_collate([samples[i % len(samples)] for i in range(micro_batch)])

    def flops_per_sample(self) -> float | None:
        """Training FLOPs (forward + backward) of one sample; None lets linscale count them."""
        return None

    def final_report(self, model: nn.Module) -> str | None:
        """Text shown once at the end of a run on rank 0 (a generated sample, say)."""
        return None


def _load_file(path: str, name: str) -> type:
    file = Path(path)
    if not file.is_file():
        raise TaskError(f"task file {path!r} not found; check the path before ':{name}'")
    mod_name = f"_linscale_user_task_{file.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    # Let the task import modules that sit beside it.
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise TaskError(f"task file {path!r} failed to import: {type(e).__name__}: {e}") from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return _attr(module, name, path)


def _attr(module: Any, name: str, where: str) -> type:
    obj = getattr(module, name, None)
    if obj is None:
        found = [k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, Task) and v is not Task]
        hint = f"; it defines {', '.join(found)}" if found else ""
        raise TaskError(f"{where} has no class {name!r}{hint}")
    return obj


def resolve_task(spec: str) -> type:
    """Find the task class named by `spec` (built-in, `file.py:Class` or `pkg.mod:Class`)."""
    spec = BUILTIN_TASKS.get(spec, spec)
    if ":" not in spec:
        raise TaskError(
            f"unknown task {spec!r}: name a built-in ({', '.join(BUILTIN_TASKS)}), "
            "a file (path/to/my_task.py:MyTask) or a module (pkg.mod:MyTask)"
        )
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise TaskError(f"malformed task {spec!r}: expected path/to/file.py:ClassName or pkg.mod:ClassName")
    if where.endswith(".py") or "/" in where:
        cls = _load_file(where, name)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise TaskError(f"cannot import module {where!r} for task {spec!r}: {e}") from e
        cls = _attr(module, name, f"module {where!r}")
    check_task_class(cls, spec)
    return cls


def check_task_class(cls: Any, spec: str) -> None:
    if not isinstance(cls, type):
        raise TaskError(f"{spec!r} is not a class")
    missing = [m for m in ("build_model", "train_data", "loss") if not callable(getattr(cls, m, None))]
    overridden = issubclass(cls, Task)
    if overridden:
        missing += [m for m in ("build_model", "train_data", "loss") if getattr(cls, m) is getattr(Task, m)]
    if missing:
        raise TaskError(f"task {spec!r} must define {', '.join(sorted(set(missing)))} (see linscale.Task)")
