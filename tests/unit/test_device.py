"""linscale.runtime.device: CPU device resolution and the cached CPU peak measurement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from linscale.runtime import device as devmod


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "linscale" / "cpu_peak_flops.json"


def no_measuring(*args, **kwargs):
    raise AssertionError("measured again instead of using the cache")


def test_measure_cpu_peak_writes_cache(cache_home):
    assert not cache_home.exists()
    value = devmod.measure_cpu_peak("fp32", 1, size=64, reps=1)
    assert value > 0 and math.isfinite(value)
    data = json.loads(cache_home.read_text())
    assert len(data) == 1
    (key,) = data
    assert "|1|fp32|" in key and torch.__version__ in key
    assert data[key] == value


def test_measure_cpu_peak_second_call_uses_cache(cache_home, monkeypatch):
    first = devmod.measure_cpu_peak("fp32", 1, size=64, reps=1)
    mtime = cache_home.stat().st_mtime_ns
    monkeypatch.setattr(devmod.torch, "randn", no_measuring)
    monkeypatch.setattr(devmod.time, "perf_counter", no_measuring)
    assert devmod.measure_cpu_peak("fp32", 1, size=64, reps=1) == first
    assert cache_home.stat().st_mtime_ns == mtime


def test_measure_cpu_peak_reads_existing_entry(cache_home, monkeypatch):
    key = f"{devmod._cpu_name()}|3|bf16|{torch.__version__}"
    cache_home.parent.mkdir(parents=True)
    cache_home.write_text(json.dumps({key: 1.25e12}))
    monkeypatch.setattr(devmod.torch, "randn", no_measuring)
    assert devmod.measure_cpu_peak("bf16", 3) == 1.25e12


def test_measure_cpu_peak_other_key_is_measured_and_added(cache_home):
    devmod.measure_cpu_peak("fp32", 1, size=32, reps=1)
    devmod.measure_cpu_peak("fp32", 2, size=32, reps=1)
    keys = json.loads(cache_home.read_text())
    assert len(keys) == 2
    assert {k.split("|")[1] for k in keys} == {"1", "2"}


def test_measure_cpu_peak_survives_corrupt_cache(cache_home):
    cache_home.parent.mkdir(parents=True)
    cache_home.write_text("{not json")
    value = devmod.measure_cpu_peak("fp32", 1, size=32, reps=1)
    assert json.loads(cache_home.read_text()) == {f"{devmod._cpu_name()}|1|fp32|{torch.__version__}": value}


def test_resolve_cpu_explicit_threads():
    dev = devmod.resolve("cpu", 0, 3, 1)
    assert dev.type == "cpu" and dev.backend == "gloo" and dev.index == 0
    assert dev.threads == 3
    assert torch.get_num_threads() == 3
    assert dev.torch_device == torch.device("cpu")
    assert dev.ddp_device_ids is None
    assert not dev.pin_memory
    assert dev.max_memory_allocated() is None
    dev.synchronize()  # a no-op on the CPU


@pytest.mark.parametrize(("cores", "local_world", "threads"), [(8, 2, 4), (8, 3, 2), (2, 4, 1), (6, 1, 6), (4, 0, 4)])
def test_resolve_cpu_shares_cores(monkeypatch, cores, local_world, threads):
    monkeypatch.setattr(devmod, "cpu_cores", lambda: cores)
    dev = devmod.resolve("cpu", 0, 0, local_world)
    assert dev.backend == "gloo"
    assert dev.threads == threads
    assert torch.get_num_threads() == threads


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_cuda_without_cuda():
    with pytest.raises(ValueError, match="runtime.device=cuda"):
        devmod.resolve("cuda", 0, 1, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_auto_falls_back_to_cpu():
    assert devmod.resolve("auto", 0, 1, 1).backend == "gloo"


def test_cpu_peak_flops_come_from_the_probe(monkeypatch):
    monkeypatch.setattr(
        devmod, "measure_cpu_peak", lambda dtype, threads: {"fp32": 1e11, "bf16": 2e11}[dtype] * threads
    )
    dev = devmod.Device("cpu", 0, "gloo", "cpu", 2)
    assert dev.peak_flops("fp32")[0] == 2e11
    assert dev.peak_flops("bf16") == (4e11, "matmul probe, 2 thread(s)")


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
    ],
)
def test_gpu_peak_table_most_specific_first(name, key):
    table = dict(devmod.GPU_PEAK_FLOPS)
    dev = devmod.Device("cuda", 0, "nccl", name, 1)
    value, source = dev.peak_flops("bf16")
    want = table[key].get("bf16") or table[key].get("fp16") or table[key]["fp32"]
    assert value == want
    assert source == f"data sheet ({key})"


def test_gpu_peak_v100_pcie_as_torch_names_it():
    value, source = devmod.Device("cuda", 0, "nccl", "Tesla V100-PCIE-16GB", 1).peak_flops("fp16")
    assert source == "data sheet (V100 PCIe)"
    assert value == dict(devmod.GPU_PEAK_FLOPS)["V100 PCIe"]["fp16"]


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA A10G", "Mystery GPU 9000"])
def test_gpu_names_match_whole_words_only(name):
    # "L4" must not claim an L40, nor "A10" an A10G: an unknown card says so instead.
    value, source = devmod.Device("cuda", 0, "nccl", name, 1).peak_flops("fp32")
    assert math.isnan(value) and "GPU_PEAK_FLOPS" in source


def test_unknown_gpu_peak_is_nan():
    value, source = devmod.Device("cuda", 0, "nccl", "Mystery GPU 9000", 1).peak_flops("fp32")
    assert math.isnan(value) and "GPU_PEAK_FLOPS" in source


@pytest.mark.parametrize(
    ("name", "bandwidth"),
    [
        ("NVIDIA A100-SXM4-80GB", 2.04e12),  # the key's words apart in the name: "A100 ... 80GB"
        ("NVIDIA A100 80GB PCIe", 2.04e12),
        ("NVIDIA A100-SXM4-40GB", 1.56e12),
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA H100 80GB HBM3", 3.35e12),
    ],
)
def test_gpu_memory_bandwidth_from_the_data_sheet(name, bandwidth):
    assert devmod.Device("cuda", 0, "nccl", name, 1).memory_bandwidth() == bandwidth
    assert devmod.gpu_data_sheet(name)[1] == bandwidth
    with pytest.raises(KeyError, match="GPU_PEAK_FLOPS"):
        devmod.gpu_data_sheet("Mystery GPU 9000")
