"""The device: type, backend, synchronisation, memory and peak FLOP/s, resolved once.

This is the only module that names CUDA. Everything else asks a `Device`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense peak FLOP/s per GPU (no sparsity), from the vendors' data sheets:
# H100/H200: NVIDIA H100 Tensor Core GPU data sheet (SXM: 989 TF bf16, 67 TF fp32; PCIe: 756/51).
# A100: NVIDIA A100 data sheet (312 TF bf16/fp16, 19.5 TF fp32). V100: NVIDIA V100 data sheet
# (SXM2 125 TF fp16 tensor, 15.7 TF fp32; PCIe 112/14). A10, L4, L40S, T4: NVIDIA product briefs.
# RTX 4090 / 3090: NVIDIA Ada / Ampere architecture white papers (fp16 tensor with fp32 accumulate).
# Keys are matched as whole words of the device name, ignoring case and '-' vs ' ' (torch
# names a V100 PCIe "Tesla V100-PCIE-16GB"), most specific first.
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("V100 PCIe", {"fp16": 112e12, "fp32": 14e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
]

# Device memory bandwidth in bytes/s, from the same data sheets (H100 SXM 3.35 TB/s, PCIe 2.0;
# A100 80GB SXM 2.04, 40GB 1.56; V100 0.9; L40S 0.864; A10 0.6; L4 0.3; T4 0.32).
GPU_MEMORY_BANDWIDTH: list[tuple[str, float]] = [
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100 80GB", 2.04e12),
    ("A100", 1.56e12),
    ("V100", 0.9e12),
    ("L40S", 0.864e12),
    ("A10", 0.6e12),
    ("L4", 0.3e12),
    ("T4", 0.32e12),
    ("RTX 4090", 1.0e12),
    ("RTX 3090", 0.936e12),
]


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def _name_matches(key: str, device_name: str) -> bool:
    """Every word of `key` is a word of the device name ("A100 80GB" matches "NVIDIA A100-SXM4-80GB")."""
    words = _words(device_name).split()
    return all(w in words for w in _words(key).split())


def gpu_data_sheet(name: str) -> tuple[dict[str, float], float]:
    """(peak FLOP/s per dtype, memory bytes/s) of a GPU of the data-sheet tables, by (part of) its name
    ("A100 SXM4 80GB", "NVIDIA H100 80GB HBM3"); a KeyError for one the tables lack."""
    peaks = next((dict(t) for key, t in GPU_PEAK_FLOPS if _name_matches(key, name)), None)
    bandwidth = next((v for key, v in GPU_MEMORY_BANDWIDTH if _name_matches(key, name)), None)
    if peaks is None or bandwidth is None:
        raise KeyError(f"{name!r} is not in GPU_PEAK_FLOPS and GPU_MEMORY_BANDWIDTH")
    return peaks, bandwidth


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def local_device_count(kind: str = "auto") -> int:
    """Default number of worker processes on this node: one per GPU, else 2 CPU processes
    (on a machine with at least 2 cores) so that data parallelism is exercised."""
    if kind in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return min(2, cpu_cores())


@dataclass
class Device:
    type: str  # "cuda" or "cpu"
    index: int
    backend: str  # "nccl" or "gloo"
    name: str
    threads: int

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.type == "cuda" else torch.device("cpu")

    @property
    def ddp_device_ids(self) -> list[int] | None:
        return [self.index] if self.type == "cuda" else None

    @property
    def pin_memory(self) -> bool:
        return self.type == "cuda"

    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize(self.index)

    def supports_fast_bf16(self) -> bool:
        """bf16 matrix products faster than fp32 (tensor cores, AVX-512 BF16 or AMX)."""
        if self.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})

    def matmul_rate(self, dtype: str = "fp32", size: int = 1024, reps: int = 6) -> float:
        """Best-of-`reps` FLOP/s of a size x size matrix product on this device."""
        tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
        a = torch.randn(size, size, dtype=tdtype, device=self.torch_device)
        b = torch.randn(size, size, dtype=tdtype, device=self.torch_device)
        for _ in range(2):
            a @ b
        self.synchronize()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            self.synchronize()
            best = min(best, time.perf_counter() - t0)
        return 2 * size**3 / best

    def memory_bandwidth(self) -> float:
        """Bytes/s this device's memory moves (read + write): the data sheet's for known GPUs, else
        measured once with a large copy (on CPUs: one process's copy rate with its threads)."""
        if self.type == "cuda":
            for key, value in GPU_MEMORY_BANDWIDTH:
                if _name_matches(key, self.name):
                    return value
        return _cached_measure(f"copy|{self.name}|{self.type}|{self.threads}", self._copy_rate)

    def _copy_rate(self, mib: int = 64, reps: int = 5) -> float:
        src = torch.ones(mib * 2**18, device=self.torch_device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        self.synchronize()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            self.synchronize()
            best = min(best, time.perf_counter() - t0)
        return 2 * src.numel() * 4 / best

    def total_memory(self, local_processes: int = 1) -> float:
        """Bytes of memory one process may plan for: the GPU's, or the host's share."""
        if self.type == "cuda":
            return float(torch.cuda.get_device_properties(self.index).total_memory)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, local_processes)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This process's random-number generator states (host, and the GPU's when there is one)."""
        states = {"cpu": torch.get_rng_state()}
        if self.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.index)
        return states

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(states["cpu"])
        if self.type == "cuda" and "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], self.index)

    def empty_cache(self) -> None:
        """Give cached, unused device memory back (after an out-of-memory probe)."""
        if self.type == "cuda":
            torch.cuda.empty_cache()

    def max_memory_allocated(self) -> int | None:
        if self.type == "cuda":
            return torch.cuda.max_memory_allocated(self.index)
        return None

    def peak_flops(self, dtype: str) -> tuple[float, str]:
        """Peak FLOP/s of one device for `dtype` ("fp32"/"bf16") and where the figure comes from."""
        if self.type == "cuda":
            for key, table in GPU_PEAK_FLOPS:
                if _name_matches(key, self.name):
                    value = table.get(dtype) or table.get("fp16") or table["fp32"]
                    return value, f"data sheet ({key})"
            return float("nan"), f"unknown GPU {self.name!r}: add it to GPU_PEAK_FLOPS"
        return measure_cpu_peak(dtype, self.threads), f"matmul probe, {self.threads} thread(s)"


CPU = Device("cpu", 0, "gloo", _cpu_name(), 0)


def resolve(kind: str, local_rank: int, threads_per_proc: int, local_world_size: int) -> Device:
    """Pick the device and backend once, and set the thread count of this process."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device=cuda but no CUDA device is visible; use runtime.device=auto or cpu")
    threads = threads_per_proc or max(1, cpu_cores() // max(1, local_world_size))
    torch.set_num_threads(threads)
    if kind in ("auto", "cuda") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return Device("cuda", index, "nccl", torch.cuda.get_device_name(index), threads)
    return Device("cpu", 0, "gloo", _cpu_name(), threads)


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "linscale" / "cpu_peak_flops.json"


def measure_cpu_peak(dtype: str, threads: int, size: int = 1024, reps: int = 6) -> float:
    """Measure the CPU's matrix-product FLOP/s once and remember it per CPU model and threads."""
    key = f"{_cpu_name()}|{threads}|{dtype}|{torch.__version__}"
    return _cached_measure(key, lambda: CPU.matmul_rate(dtype, size, reps))


def read_json_map(path: Path) -> dict:
    """A JSON object kept in the cache folder; {} when missing or damaged."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def remember(path: Path, key: str, value: float) -> None:
    """Set `key` in the JSON object at `path`, replaced atomically; a read-only home only skips it."""
    known = read_json_map(path)
    known[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def _cached_measure(key: str, measure) -> float:
    """`measure()` once per key on this machine, remembered in the user's cache folder (a read-only home
    only costs a re-measurement next time)."""
    known = read_json_map(_cache_file())
    if key in known:
        return float(known[key])
    value = measure()
    remember(_cache_file(), key, value)
    return value
