"""Does the image loader keep the training step fed? Loader capacity against step consumption.

For two datasets of the built-in `image` task,

  digits  the built-in handwritten digits (1,437 training PNGs of 8 x 8), trained at 16 x 16 with
          the task's defaults for them (ViT 4 x 64, patch 4, batch 64);
  photo   a synthetic tree of photo-like JPEGs (--photo-images of 160 x 120: a colour gradient plus
          coarse and fine noise, about 8 KB each, 10 classes), trained at --photo-size with a small
          ViT (patch 8, otherwise the task's defaults: random resized crop from 8% of the area, flip),
          so decoding and cropping cost something real,

three figures are measured:

1. Loader alone: images/s of a torch DataLoader over the task's own `train_data(DataShard(...))`
   with the training loop's batch sampler (`StepSampler`, keyed by epoch), with 0, 1 and 2 worker
   processes; the batches a pass starts with (what the workers had prefetched) are left out. With
   workers, also the time `next()` takes to hand over a batch that is ready: the floor of the data
   wait whatever the number of workers.
2. Step consumption: images/s the training step consumes when data is free: the loop's own
   `train_step` (the task's model and loss, its precision, AdamW, clipping, the LR schedule) on a
   batch already in host memory, on the device and with the threads the loop sets for one process
   on this node (on a GPU host the step includes the batch's copy to the GPU, as in the loop).
   Loader capacity / step consumption > 1 means that the loader alone could keep up. With 0
   workers loading is not overlapped with the step, so the step waits load / (load + compute) =
   1 / (1 + ratio) of the time: under 2% needs a ratio of 49 or more.
3. The real thing: `linscale train image --nproc-per-node=1` runs (no evaluation, no checkpoint)
   with the default loader setting, with `--train.loader_workers=0,1,2`, and with 1 worker and one
   compute thread (the other core left to the worker): steady samples/s, and the share of the step
   spent waiting for the next batch (summary.json: time_data_pct). The goal: under 2% with the
   default settings. "vs 0 workers" divides each run's samples/s by that of the 0-worker run of
   the same repeat, and takes the median.

Measurements 1 and 2 alternate within each pass (the order rotates) and are medians over passes;
the training runs alternate too, their order rotating every repeat. The machine may be shared: each
training run reports the cores other processes used while it ran, and is run again (once, after
waiting for a quiet second) when they used more than --max-others.

    python benchmarks/bench_images.py [--passes 5] [--repeats 1] [--steps 50]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from linscale.config import load_config  # noqa: E402
from linscale.data.digits import write_digits  # noqa: E402
from linscale.runtime import device as devmod  # noqa: E402
from linscale.runtime import parallel  # noqa: E402
from linscale.task import DataShard  # noqa: E402
from linscale.tasks.image import ImageTask, ImageTaskConfig  # noqa: E402
from linscale.train import loop  # noqa: E402
from linscale.train.batching import StepSampler, plan_batch  # noqa: E402
from linscale.train.optim import build_optimizer, build_scheduler  # noqa: E402
from linscale.train.precision import resolve_precision  # noqa: E402

GOAL_PCT = 2.0
# Training-run settings: extra command-line options of `linscale train image`.
SETTINGS = {
    "default": [],
    "0 workers": ["--train.loader_workers=0"],
    "1 worker": ["--train.loader_workers=1"],
    "2 workers": ["--train.loader_workers=2"],
    "1 worker + 1 thread": ["--train.loader_workers=1", "--runtime.threads_per_proc=1"],
}


# --------------------------------------------------------------------------------------------
# Data


def photo_folder(root: Path, files: int, size: tuple[int, int] = (160, 120), classes: int = 10, seed: int = 0) -> None:
    """`files` photo-like JPEGs of `size` (w, h) in `classes` folders: a colour gradient in a random
    direction, coarse noise (blobs) and fine noise (texture, which JPEG cannot compress away)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(files):
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * xx / w + np.sin(a) * yy / h)[..., None]
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        coarse = rng.normal(128, 40, (h // 16 + 1, w // 16 + 1, 3)).clip(0, 255).astype(np.uint8)
        blobs = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32) - 128
        pixels = c0 + (c1 - c0) * ramp + blobs + rng.normal(0, 12, (h, w, 3))
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=90)


def datasets(args, tmp: Path) -> dict[str, dict]:
    """name -> {"task": [task options], "what": description}."""
    out = {}
    if "digits" in args.datasets:
        data = write_digits(tmp / "digits")
        # Evaluation off: it is left out of steady-state figures anyway, and costs time here.
        out["digits"] = {
            "task": [f"--task.data={data}", "--task.eval_split=none"],
            "what": "built-in digits: 1,437 PNGs of 8x8, trained at 16x16 (task defaults: ViT 4x64, patch 4)",
        }
    if "photo" in args.datasets:
        data = tmp / "photo"  # DATA/<class>/<images>: a training split only, so no evaluation
        t0 = time.perf_counter()
        photo_folder(data, args.photo_images)
        mb = sum(f.stat().st_size for f in data.rglob("*.jpg")) / 1e6
        took = time.perf_counter() - t0
        print(f"wrote {args.photo_images} JPEGs of 160x120 ({mb:.1f} MB) in {took:.1f} s", flush=True)
        out["photo"] = {
            "task": [f"--task.data={data}", f"--task.image_size={args.photo_size}", "--task.patch_size=8"],
            "what": f"{args.photo_images} JPEGs of 160x120 ({mb / args.photo_images * 1e3:.0f} KB each), random "
            f"resized crop to {args.photo_size}x{args.photo_size} + flip (ViT 4x64, patch 8)",
        }
    return out


def task_config(task_options: list[str]):
    """The run's configuration as `linscale train image OPTIONS` would build it (task defaults included)."""
    from linscale.config import parse_overrides

    return load_config(None, parse_overrides(task_options), ImageTaskConfig, ImageTask.defaults)


# --------------------------------------------------------------------------------------------
# 1 and 2: the loader alone and the step alone, in this process


class LoaderProbe:
    """A persistent DataLoader over the task's training data, as `make_train_loader` builds it."""

    def __init__(self, task, cfg, plan, workers: int, pin_memory: bool) -> None:
        data = task.train_data(DataShard(0, 1, cfg.train.seed))
        sampler = StepSampler(len(data), plan, 0, cfg.train.seed, keyed=bool(getattr(data, "epoch_keys", False)))
        self.workers = workers
        self.micro = plan.micro_batch
        self.loader = torch.utils.data.DataLoader(
            data, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0
        )
        self.it = iter(self.loader)

    def rate(self, batches: int) -> tuple[float, float | None]:
        """Images/s over `batches` batches, after taking what the workers prefetched while idle; with
        workers also the seconds `next()` takes to hand over a batch that is ready (the transfer from
        the worker process). The workers refill their prefetch before this returns, so they do not
        run beside the next measurement."""
        for _ in range(2 * self.workers + 1):  # prefetch_factor (2) per worker, and one more
            next(self.it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(self.it)
        rate = batches * self.micro / (time.perf_counter() - t0)
        if not self.workers:
            return rate, None
        refill = 1.5 * 2 * self.workers * self.micro / rate + 0.05  # 2 batches per worker
        time.sleep(refill)
        t1 = time.perf_counter()
        next(self.it)
        handoff = time.perf_counter() - t1
        time.sleep(refill / 2)
        return rate, handoff

    def close(self) -> None:
        del self.it
        del self.loader


class StepProbe:
    """The loop's `train_step` on one batch held in memory: what the step consumes when data is free."""

    def __init__(self, task, cfg, plan, device) -> None:
        data = task.train_data(DataShard(0, 1, cfg.train.seed))
        self.batch = torch.utils.data.default_collate([data[(0, i)] for i in range(plan.micro_batch)])
        torch.manual_seed(cfg.train.seed)
        self.task, self.plan, self.device, self.cfg = task, plan, device, cfg
        self.model = task.build_model().to(device.torch_device)
        self.precision = resolve_precision(cfg.runtime.precision, device)
        self.opt = build_optimizer(self.model, cfg.optim, device.type)
        self.sched = build_scheduler(self.opt, cfg.optim, 10**6)
        self.clock = parallel.CommClock()
        self.loss_acc = torch.zeros(2, dtype=torch.float64)
        self.steps(2)  # AdamW's states, the allocator's caches

    def steps(self, n: int) -> None:
        for _ in range(n):
            loop.train_step(
                self.task,
                self.model,
                itertools.repeat(self.batch),
                self.plan,
                self.precision,
                self.device,
                self.clock,
                self.opt,
                self.sched,
                self.cfg.train.grad_clip,
                self.loss_acc,
                check_finite=self.cfg.train.max_nonfinite > 0,
            )

    def rate(self, steps: int) -> float:
        self.steps(1)
        t0 = time.perf_counter()
        self.steps(steps)
        return steps * self.plan.global_batch / (time.perf_counter() - t0)


def in_process(name: str, spec: dict, args) -> dict:
    cfg = task_config(spec["task"])
    # The device and threads the loop sets for one process on this node (threads_per_proc=0: all cores).
    device = devmod.resolve(cfg.runtime.device, 0, cfg.runtime.threads_per_proc, 1)
    task = loop.make_task(ImageTask, cfg)
    plan = plan_batch(cfg.train.global_batch, 1, cfg.train.micro_batch)
    probes: dict = {w: LoaderProbe(task, cfg, plan, w, device.pin_memory) for w in args.workers}
    probes["step"] = StepProbe(task, cfg, plan, device)
    rates: dict = {k: [] for k in probes}
    handoff: dict = {w: [] for w in args.workers if w}
    keys = list(probes)
    try:
        for p in range(args.passes):
            for k in keys[p % len(keys) :] + keys[: p % len(keys)]:
                if k == "step":
                    rates[k].append(probes[k].rate(args.step_steps))
                else:
                    rate, ready = probes[k].rate(args.loader_batches)
                    rates[k].append(rate)
                    if ready is not None:
                        handoff[k].append(ready)
            line = ", ".join(f"{k if k == 'step' else f'{k} workers'} {rates[k][-1]:,.0f}" for k in keys)
            print(f"  {name} pass {p + 1}/{args.passes}: images/s {line}", flush=True)
    finally:
        for k in args.workers:
            probes[k].close()
    return {
        "rates": rates,
        "median": {k: statistics.median(v) for k, v in rates.items()},
        "handoff": {w: statistics.median(v) for w, v in handoff.items()},
        "threads": device.threads,
        "device": device.type,
        "precision": probes["step"].precision.name,
        "batch": plan.global_batch,
        "params": sum(p.numel() for p in probes["step"].model.parameters()),
    }


# --------------------------------------------------------------------------------------------
# 3: training runs


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def our_seconds() -> float:
    """CPU seconds of this process and the children it waited for (their own children included)."""
    ru, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime + own.ru_utime + own.ru_stime


def wait_quiet(limit: float, max_wait: float = 30.0) -> None:
    """Wait (at most `max_wait` s) for a second in which other processes use less than `limit` cores."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        b0, o0 = busy_seconds(), our_seconds()
        time.sleep(1.0)
        if (busy_seconds() - b0) - (our_seconds() - o0) < limit:
            return


def train_run(spec: dict, setting: str, steps: int, run_dir: Path, max_others: float) -> dict:
    """One training run; run again (once) when other processes took more than `max_others` cores meanwhile."""
    cmd = [
        sys.executable,
        "-m",
        "linscale",
        "train",
        "image",
        *spec["task"],
        "--nproc-per-node=1",
        f"--train.max_steps={steps}",
        "--train.eval_every=0",
        "--checkpoint.at_end=false",
        "--log.progress=false",
        f"--log.dir={run_dir}",
        *SETTINGS[setting],
    ]
    foreign = 0.0
    for attempt in range(2):
        if attempt:
            print(f"    ({setting}: other processes used {foreign:.2f} cores meanwhile; measuring again)", flush=True)
            wait_quiet(max_others)
        b0, o0, t0 = busy_seconds(), our_seconds(), time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        foreign = max(0.0, ((busy_seconds() - b0) - (our_seconds() - o0)) / (time.monotonic() - t0))
        if proc.returncode != 0:
            sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if foreign < max_others:
            break
    s = json.loads((run_dir / "summary.json").read_text())
    return {
        "samples_s": s["steady_samples_per_second"],
        "data_pct": s["time_data_pct"],
        "data_ms": s["time_data_ms"],
        "fwd_bwd_ms": s["time_fwd_bwd_ms"],
        "step_ms": s["steady_step_time_ms"],
        "foreign": foreign,
    }


def train_runs(name: str, spec: dict, args, tmp: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s: [] for s in args.settings}
    for r in range(args.repeats):
        order = args.settings[r % len(args.settings) :] + args.settings[: r % len(args.settings)]
        for setting in order:
            folder = tmp / f"run-{name}-{r}-{setting.replace(' ', '_').replace(',', '')}"
            res = train_run(spec, setting, args.steps, folder, args.max_others)
            runs[setting].append(res)
            print(
                f"  {name} repeat {r + 1}/{args.repeats} {setting}: {res['samples_s']:,.0f} samples/s, data "
                f"{res['data_ms']:.1f} ms = {res['data_pct']:.2f}% of the step (other processes: "
                f"{res['foreign']:.2f} cores)",
                flush=True,
            )
    return runs


# --------------------------------------------------------------------------------------------
# Report


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(name: str, spec: dict, ip: dict, runs: dict[str, list[dict]], args) -> None:
    m = ip["median"]
    step = m["step"]
    print(f"\n[{name}] {spec['what']}")
    print(
        f"  {ip['params'] / 1e6:.2f}M parameters, batch {ip['batch']}, {ip['device']}, {ip['precision']}, "
        f"{ip['threads']} thread(s); in-process figures are medians of {args.passes} passes"
    )
    print(
        f"  step consumption, data free: {step:,.0f} images/s ({' / '.join(f'{v:,.0f}' for v in ip['rates']['step'])})"
    )
    print(f"  {'loader workers':<16} {'loader images/s':>16} {'loader / step':>14} {'per pass':>30}")
    for w in args.workers:
        per = " / ".join(f"{v:,.0f}" for v in ip["rates"][w])
        print(f"  {w:<16} {m[w]:>16,.0f} {m[w] / step:>14.2f} {per:>30}")
    if ip["handoff"]:
        ms = {w: 1e3 * v for w, v in ip["handoff"].items()}
        step_ms = 1e3 * ip["batch"] / step
        shown = ", ".join(f"{w} worker(s) {v:.1f} ms" for w, v in ms.items())
        print(
            f"  handing over a ready batch from a worker: {shown}; against the data-free step of {step_ms:.0f} ms "
            f"that is {100 * min(ms.values()) / step_ms:.1f}% or more of the step, the floor of the data wait with "
            "workers"
        )
    if 0 in args.workers:
        ratio0 = m[0] / step
        print(
            f"  0 workers load serially: expected data wait 1 / (1 + {ratio0:.2f}) = {100 / (1 + ratio0):.1f}% of "
            f"the step (under {GOAL_PCT:g}% needs loader / step >= {100 / GOAL_PCT - 1:.0f})"
        )
    base = runs.get("0 workers") or runs.get("default") or next(iter(runs.values()))
    head = (
        f"  {'training run':<20} {'samples/s':>10} {'vs 0 workers':>12} {'data ms':>8} {'data %':>7} "
        f"{'fwd+bwd ms':>10} {'step ms':>8} {'others, cores':>13}"
    )
    # Each run against the 0-worker run of the same repeat (run next to it), then the median.
    ratio = {
        s: statistics.median(a["samples_s"] / b["samples_s"] for a, b in zip(rs, base, strict=True))
        for s, rs in runs.items()
    }
    print(f"  `linscale train image`, 1 process, {args.steps} steps; medians of {args.repeats} run(s)")
    print(head)
    for setting, rs in runs.items():
        print(
            f"  {setting:<20} {med(rs, 'samples_s'):>10,.0f} {ratio[setting]:>12.2f} {med(rs, 'data_ms'):>8.1f} "
            f"{med(rs, 'data_pct'):>7.2f} {med(rs, 'fwd_bwd_ms'):>10.1f} {med(rs, 'step_ms'):>8.1f} "
            f"{max(r['foreign'] for r in rs):>13.2f}"
        )
    parts = []
    if "default" in runs:
        d = med(runs["default"], "data_pct")
        parts.append(f"default: data wait {d:.2f}% ({'met' if d < GOAL_PCT else 'NOT met'}, goal < {GOAL_PCT:g}%)")
    meeting = [f"{s} ({ratio[s]:.2f}x)" for s in runs if s != "default" and med(runs[s], "data_pct") < GOAL_PCT]
    parts.append(f"under {GOAL_PCT:g}% (samples/s vs 0 workers): {'; '.join(meeting) if meeting else 'none'}")
    fastest = max(runs, key=lambda s: med(runs[s], "samples_s"))
    parts.append(f"fastest: {fastest} ({med(runs[fastest], 'samples_s'):,.0f} samples/s)")
    print(f"verdict [{name}]: " + "; ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5, help="passes of the in-process measurements (1 and 2)")
    ap.add_argument("--loader-batches", type=int, default=12, help="batches timed per loader pass")
    ap.add_argument("--step-steps", type=int, default=6, help="steps timed per step pass")
    ap.add_argument("--repeats", type=int, default=1, help="training runs per setting")
    ap.add_argument("--steps", type=int, default=50, help="steps per training run (the first 5 are warm-up)")
    ap.add_argument("--max-others", type=float, default=0.3, help="cores others may use in a run before it reruns")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--datasets", nargs="+", default=["digits", "photo"], choices=["digits", "photo"])
    ap.add_argument("--photo-images", type=int, default=2000)
    ap.add_argument("--photo-size", type=int, default=64, help="training resolution of the photo dataset")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="linscale-bench-images-") as tmp_name:
        tmp = Path(tmp_name)
        specs = datasets(args, tmp)
        results = {}
        for name, spec in specs.items():
            ip = in_process(name, spec, args)
            runs = train_runs(name, spec, args, tmp)
            results[name] = (spec, ip, runs)
    print("\n***** benchmark: image loader against the training step *****")
    print(f"  command = python benchmarks/bench_images.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"  machine = {devmod.cpu_cores()} cores ({devmod._cpu_name()}), torch {torch.__version__}")
    for name, (spec, ip, runs) in results.items():
        report(name, spec, ip, runs, args)
    print(
        f"\ntotal {time.perf_counter() - t_start:.0f} s; load average {load0:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end"
    )


if __name__ == "__main__":
    main()
