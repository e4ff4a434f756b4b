"""Run configuration: one dataclass per component, composed into `RunConfig`.

Each component receives only its own section. TOML files load strictly (an unknown key is
an error that names the nearest known key) and command-line overrides use
`--section.field=value`. The task owns a section of its own, `[task]`, described by the
task's `Config` dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by `linscale train --help-config`)."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """Bad configuration given by the user; the message names the fix."""


@dataclass(kw_only=True)
class TrainConfig:
    global_batch: int = opt(32, "Samples per optimizer step, summed over all replicas.")
    global_batch_tokens: int = opt(
        0,
        "Tokens per optimizer step; when > 0 it overrides global_batch (needs a task with tokens_per_sample).",
    )
    micro_batch: int | str = opt(
        0,
        "Samples per forward/backward on one replica; 0 = the whole share of the replica; auto = the largest "
        "that divides the share and fits the device memory (from the memory estimate; probed on GPUs), the "
        "accumulation keeping the global batch.",
    )
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = no limit).")
    max_tokens: int = opt(0, "Stop after this many training tokens (0 = no limit).")
    max_time: float = opt(0.0, "Stop after this many seconds of training (0 = no limit).")
    target_loss: float = opt(
        0.0,
        "Stop after the first evaluation whose loss is <= this value (0 = off; needs train.eval_every > 0 "
        "and a task with eval_data). A budget (max_steps/max_tokens/max_time) is still required.",
    )
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 = off).")
    seed: int = opt(1337, "Seed for model initialisation and data order.")
    eval_every: int = opt(0, "Evaluate every N steps and at the end (0 = only at the end).")
    eval_batches: int = opt(8, "Micro-batches per replica in one evaluation (0 = the whole evaluation set).")
    log_every: int = opt(10, "Reduce the loss across replicas and log every N steps.")
    loader_workers: int = opt(
        -1, "Data-loader worker processes per replica (-1 = auto: up to 4 on GPU; on CPU 1 for image data, else 0)."
    )
    max_nonfinite: int = opt(
        5,
        "Skip a step whose loss or gradient is NaN/Inf, and stop the run after this many in a row "
        "(0 = no check: saves one host synchronisation per step).",
    )
    spike_factor: float = opt(
        3.0, "Report a loss spike when a logged loss exceeds this multiple of the recent mean (0 = off)."
    )

    def __post_init__(self) -> None:
        if isinstance(self.micro_batch, str) and self.micro_batch != "auto":
            raise ConfigError(f"train.micro_batch must be an integer >= 0 or auto, got {self.micro_batch!r}")
        for name in ("global_batch", "global_batch_tokens", "micro_batch", "max_steps", "max_tokens", "eval_batches"):
            if getattr(self, name) != "auto" and getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch < 1 and self.global_batch_tokens < 1:
            raise ConfigError("train.global_batch must be >= 1 (or set train.global_batch_tokens)")
        if self.max_time < 0:
            raise ConfigError(f"train.max_time must be >= 0 seconds, got {self.max_time}")
        if self.max_nonfinite < 0:
            raise ConfigError(f"train.max_nonfinite must be >= 0 (0 = no check), got {self.max_nonfinite}")
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ConfigError(f"train.spike_factor must be > 1 (or 0 = off), got {self.spike_factor}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.target_loss < 0:
            raise ConfigError(f"train.target_loss must be >= 0 (0 = off), got {self.target_loss}")
        if self.target_loss > 0 and self.eval_every < 1:
            raise ConfigError(
                f"train.target_loss={self.target_loss} is checked at evaluations, but train.eval_every="
                f"{self.eval_every} evaluates only at the end; set train.eval_every=N (for example 100)"
            )
        if self.max_steps == 0 and self.max_tokens == 0 and self.max_time == 0:
            raise ConfigError("no stop condition: set train.max_steps, train.max_tokens or train.max_time")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = opt(3e-4, "Peak learning rate.")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices only.")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    impl: str = opt("auto", "AdamW kernel: auto (fused where available, else foreach), fused, foreach.")
    schedule: str = opt("cosine", "LR after warm-up: cosine (to min_lr_ratio * lr) or constant.")
    warmup_steps: int = opt(10, "Linear warm-up steps.")
    min_lr_ratio: float = opt(0.1, "Final LR of the cosine schedule as a fraction of lr.")
    lr_scaling: str = opt(
        "none",
        "Scale optim.lr when the global batch differs from optim.base_batch: none, linear (lr x B / base) or "
        "sqrt (lr x sqrt(B / base)); the scaled peak is reached through the warm-up.",
    )
    base_batch: int = opt(
        0, "The global batch (samples) optim.lr was tuned for, for optim.lr_scaling (0 = the task's default batch)."
    )

    def __post_init__(self) -> None:
        _choice("optim.impl", self.impl, ("auto", "fused", "foreach"))
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _choice("optim.lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        if self.base_batch < 0:
            raise ConfigError(f"optim.base_batch must be >= 0 (0 = the task's default batch), got {self.base_batch}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class ParallelConfig:
    strategy: str = opt(
        "ddp",
        "ddp (replicated), zero1 (optimizer states sharded), zero2 (+ gradients), zero3 or fsdp (everything "
        "sharded), hsdp (sharded inside a node, replicated across nodes), auto (the simplest that fits).",
    )
    bucket_mb: float = opt(25.0, "DDP gradient bucket size in MiB.")
    gradient_as_bucket_view: bool = opt(True, "Let gradients alias DDP's buckets (saves a copy).")
    activation_checkpointing: str = opt(
        "none", "Recompute activations in backward: none, full (every block) or K (every K-th block)."
    )
    comm_hook: str = opt(
        "none",
        "ddp/zero1 gradient compression for slow links: none, bf16 or fp16 (all-reduce in half precision), "
        "powersgd (low-rank PowerSGD with error feedback).",
    )
    powersgd_rank: int = opt(1, "PowerSGD: rank of the gradient approximation (higher = closer to exact).")
    powersgd_warmup: int = opt(10, "PowerSGD: exact all-reduce for the first N steps before compressing (>= 2).")
    reduce_dtype: str = opt("fp32", "zero2/zero3/fsdp/hsdp: dtype of the gradient reduction, fp32 or bf16.")

    def __post_init__(self) -> None:
        _choice("parallel.strategy", self.strategy, STRATEGIES)
        _choice("parallel.comm_hook", self.comm_hook, COMM_HOOKS)
        _choice("parallel.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        if self.powersgd_rank < 1:
            raise ConfigError(f"parallel.powersgd_rank must be >= 1, got {self.powersgd_rank}")
        if self.powersgd_warmup < 2:
            # PowerSGD's error feedback needs at least one exact step first (torch refuses <= 1).
            raise ConfigError(f"parallel.powersgd_warmup must be >= 2, got {self.powersgd_warmup}")
        if self.bucket_mb <= 0:
            raise ConfigError(f"parallel.bucket_mb must be > 0, got {self.bucket_mb}")
        ac = self.activation_checkpointing
        if ac not in ("none", "full") and not (ac.isdigit() and int(ac) >= 1):
            raise ConfigError(
                f"parallel.activation_checkpointing must be none, full or a positive integer K, got {ac!r}"
            )

    @property
    def checkpoint_every(self) -> int:
        """0: no activation checkpointing; k: every k-th block."""
        ac = self.activation_checkpointing
        return 0 if ac == "none" else 1 if ac == "full" else int(ac)


STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp", "auto")
COMM_HOOKS = ("none", "bf16", "fp16", "powersgd")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed")


@dataclass(kw_only=True)
class RuntimeConfig:
    device: str = opt("auto", "auto (CUDA when present, else CPU), cuda or cpu.")
    precision: str = opt(
        "auto",
        "auto (bf16-mixed where the device computes bf16 fast, else fp32), fp32, bf16-mixed (bf16 autocast), "
        "bf16-true (bf16 parameters in compute, fp32 reduction and optimizer; zero2/zero3/fsdp/hsdp), "
        "fp16-mixed (fp16 autocast with loss scaling).",
    )
    threads_per_proc: int = opt(0, "CPU threads per process (0 = cores / local processes).")
    timeout: float = opt(300.0, "Seconds a collective may take before the job fails.")
    emulate_tflops: float = opt(
        0.0,
        "Emulated device speed for scaling studies (0 = off): each block's forward and backward take the time "
        "they would on a device of this many TFLOP/s (waits replace the compute's duration), communication stays "
        "real. Meant for CPU processes on emulated clusters; see docs/emulation.md.",
    )
    profile: str = opt(
        "auto",
        "The machine description the summary's predicted step time uses: auto (this device and a quick network "
        "probe), a profile name from `linscale plan --list-clusters`, a JSON profile or a `linscale doctor` "
        "report; off = no prediction.",
    )

    def __post_init__(self) -> None:
        _choice("runtime.device", self.device, ("auto", "cpu", "cuda"))
        _choice("runtime.precision", self.precision, PRECISIONS)
        if self.timeout <= 0:
            raise ConfigError(f"runtime.timeout must be > 0, got {self.timeout}")
        if self.emulate_tflops < 0:
            raise ConfigError(f"runtime.emulate_tflops must be >= 0 (0 = off), got {self.emulate_tflops}")


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int = opt(1000, "Save a checkpoint every N optimizer steps (0 = only at the end).")
    at_end: bool = opt(True, "Save a checkpoint when the run ends (also when stopped by a signal).")
    keep_last: int = opt(3, "Keep the newest N checkpoints and delete older ones (0 = keep all).")
    async_save: bool = opt(
        False, "Write checkpoints in the background: training waits only for the copy to host memory."
    )
    dir: str = opt("", "Where checkpoints go (default: RUN_DIR/checkpoints; shared by every node).")
    resume: str = opt(
        "auto",
        "auto (continue from the newest complete checkpoint in the checkpoint folder, if any), none, or a "
        "path: a checkpoint, a checkpoints folder or a run directory.",
    )

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval must be >= 0 (0 = only at the end), got {self.interval}")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last must be >= 0 (0 = keep all), got {self.keep_last}")
        if not self.resume:
            raise ConfigError("checkpoint.resume must be auto, none or a path")


@dataclass(kw_only=True)
class LogConfig:
    dir: str = opt("", "Run directory (default: runs/<task>-<time>).")
    progress: bool = opt(True, "Show a progress bar on rank 0.")
    tensorboard: bool = opt(True, "Write TensorBoard event files into the run directory.")
    save_model: bool = opt(False, "Save the final parameters, whole, as model.pt in the run directory.")


@dataclass(kw_only=True)
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    task: Any = None  # the task's own Config dataclass instance, or None


SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "runtime": RuntimeConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _unknown(kind: str, key: str, known: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(known))}"
    return ConfigError(f"unknown {kind} {key!r}{hint}")


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, strictly."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if type(None) in typing.get_args(typ) and (value is None or value == "none"):
            return None
        if int in args and str in args:  # a number or a word such as "auto"
            try:
                return _coerce(name, value, int)
            except ConfigError:
                return str(value)
        typ = args[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} expects true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            text = str(value).replace("_", "")
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        except (ValueError, OverflowError):
            raise ConfigError(f"{name} expects an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} expects a number, got {value!r}") from None
    if typ is str:
        return str(value)
    return value


def build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    """Instantiate `cls` from `values`, rejecting unknown keys and coercing types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = {name: f.type for name, f in fields.items()}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(f"key in [{section}]", key, list(fields))
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except TypeError as e:  # a task Config without kw_only defaults, for example
        raise ConfigError(f"[{section}]: {e}") from None


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """`["--train.max_steps=5", "--optim.lr", "1e-3"]` -> {"train": {"max_steps": "5"}, ...}."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unrecognised argument {arg!r}; overrides look like --section.field=value "
                "(for example --train.max_steps=100)"
            )
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name.replace("-", "_")] = value
        i += 1
    return out


def load_config(
    path: str | Path | None,
    overrides: dict[str, dict[str, Any]],
    task_config_cls: type | None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """Merge task defaults < TOML file < overrides, strictly, into a `RunConfig`."""
    merged: dict[str, dict[str, Any]] = {}
    layers = [defaults or {}]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            layers.append(tomllib.loads(p.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    layers.append(overrides)
    known = [*SECTIONS, "task"]
    for layer in layers:
        for section, values in layer.items():
            if section not in known:
                raise _unknown("config section", section, known)
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] must be a table of key = value pairs")
            merged.setdefault(section, {}).update(values)
    parts = {name: build_section(name, cls, merged.get(name, {})) for name, cls in SECTIONS.items()}
    task_values = merged.get("task", {})
    if task_config_cls is None:
        if task_values:
            raise ConfigError(f"this task takes no [task] settings, got {', '.join(sorted(task_values))}")
        task_cfg = None
    else:
        task_cfg = build_section("task", task_config_cls, task_values)
    return RunConfig(**parts, task=task_cfg)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    if cfg.task is not None:
        out["task"] = dataclasses.asdict(cfg.task)
    return out


def to_toml(data: dict[str, Any]) -> str:
    """Write a two-level dict of scalars as TOML (enough for the resolved config)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        # A JSON string is a valid TOML basic string: quotes, backslashes and control
        # characters are escaped the same way.
        return json.dumps(str(v), ensure_ascii=False)

    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def describe(cfg: Any, section: str) -> list[str]:
    """Help lines for every field of a section: `--section.field=value` (the value in effect
    for `cfg`, an instance, or the default for a class), then the field's help text."""
    rows = []
    for f in dataclasses.fields(cfg):
        if isinstance(cfg, type):
            value = f.default if f.default is not dataclasses.MISSING else "(required)"
        else:
            value = getattr(cfg, f.name)
        rows.append((f"--{section}.{f.name}={value}", f.metadata.get("help", "")))
    width = max((len(r[0]) for r in rows), default=0)
    return [f"  {flag:<{width}}  {text}".rstrip() for flag, text in rows]
