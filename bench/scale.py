"""Scale benchmark (issue 13): sharded throughput and peak memory of `robustlab audit`, measured side by side.

    python bench/scale.py                        # both parts, ResNet-18 (random weights), CPU
    python bench/scale.py --part throughput      # 2 gloo processes x 1 thread vs 1 process x 1 thread
    python bench/scale.py --part memory --sizes 1000,10000
    python bench/scale.py --model small          # a small CIFAR-shaped CNN: the same code paths, minutes less

Throughput: the same audit (PGD-10, Linf 8/255, uniform random 3x32x32 inputs labelled with the network's own
predictions, so every sample is attacked) run by one process
and by `torchrun --standalone --nproc_per_node 2`, each process on one thread; the figure is the
audit's own time (results.json metadata.seconds: no interpreter start-up), and the two runs'
samples.csv must be equal (sharding in whole batches gives the one-process result bit for bit).
Target: >= 1.8x.

Memory: peak RSS (the process's ru_maxrss, read with os.wait4) of a PGD-10 audit of N samples,
for each N in --sizes. Target: the largest size's peak over the smallest's < 1.5x, i.e. the
samples add only their per-sample rows and the inputs themselves, never a copy per attack.

Each audit is a fresh `python -m robustlab` process, as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def small_cnn() -> nn.Module:
    """A small CIFAR-shaped CNN (3x32x32 -> 10): the memory benchmark's quick stand-in for ResNet-18."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


MODELS = {"resnet18": f"{HERE / 'resnet.py'}:resnet18", "small": f"{HERE / 'scale.py'}:small_cnn"}


def _network(model: str) -> nn.Module:
    torch.manual_seed(0)
    if model == "small":
        return small_cnn().eval()
    sys.path.insert(0, str(HERE))
    from resnet import resnet18

    return resnet18().eval()


def _weights(folder: Path, model: str) -> Path:
    """The random-weight network's state dict (seed 0), so every run audits the same model."""
    path = folder / f"{model}.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _network(model).state_dict().items()}, str(path))
    return path


def _data(folder: Path, n: int, model: str, labels: str = "predicted") -> Path:
    """Uniform random inputs labelled with the network's own predictions: clean accuracy 100%, so every
    sample is attacked (with random labels, `labels="random"`, a random network gets 10% right and 90%
    are never attacked)."""
    _weights(folder, model)
    path = folder / f"random-{model}-{n}-{labels}.npz"
    if labels == "random" and not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.random((n, 3, 32, 32), dtype=np.float32), y=rng.integers(0, 10, n))
    if not path.exists():
        from safetensors.torch import load_file

        x = np.random.default_rng(0).random((n, 3, 32, 32), dtype=np.float32)
        net = _network(model)
        net.load_state_dict(load_file(str(_weights(folder, model))))
        with torch.no_grad():
            y = torch.cat([net(torch.from_numpy(x[a:a + 256])).argmax(1) for a in range(0, n, 256)]).numpy()
        np.savez(path, x=x, y=y)
    return path


def _env(threads: int, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore", ROBUSTLAB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    return env


def _audit_args(model: str, data: Path, out: Path, batch: int, steps: int) -> list[str]:
    return ["-m", "robustlab", "audit", "--model", MODELS[model], "--weights", str(out.parent / f"{model}.safetensors"),
            "--data", str(data),
            "--attack", "pgd", "--steps", str(steps), "--eps", "8/255", "--suite", "none", "--checks", "none",
            "--batch-size", str(batch), "--device", "cpu", "--quiet", "--out", str(out)]


def _run(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes of the process and, for torchrun, its largest worker)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nexit {process.returncode}:\n{stderr[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def throughput(folder: Path, model: str, n: int, batch: int, steps: int) -> dict:
    data = _data(folder, n, model)
    env = _env(1, folder / "cache")
    one, two = folder / "one", folder / "two"
    wall1, _ = _run([sys.executable, *_audit_args(model, data, one, batch, steps)], env)
    wall2, _ = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     *_audit_args(model, data, two, batch, steps)], env)
    seconds1 = json.loads((one / "results.json").read_text())["metadata"]["seconds"]
    seconds2 = json.loads((two / "results.json").read_text())["metadata"]["seconds"]
    same = (one / "samples.csv").read_bytes() == (two / "samples.csv").read_bytes()
    return {"n": n, "batch": batch, "steps": steps, "one_process_s": seconds1, "two_processes_s": seconds2,
            "speedup": seconds1 / seconds2, "wall_one_s": wall1, "wall_two_s": wall2,
            "samples_equal": same}


def memory(folder: Path, model: str, sizes: list[int], batch: int, steps: int, threads: int,
           labels: str) -> list[dict]:
    out = []
    for n in sizes:
        data = _data(folder, n, model, labels)
        wall, peak = _run([sys.executable, *_audit_args(model, data, folder / f"mem-{n}", batch, steps)],
                          _env(threads, folder / "cache"))
        out.append({"n": n, "labels": labels, "peak_rss_mb": peak / 2**20, "wall_s": wall,
                    "input_mb": n * 3 * 32 * 32 * 4 / 2**20})
        print(f"#   memory n={n} ({labels} labels): peak RSS {peak / 2**20:.0f} MiB in {wall:.0f}s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="throughput,memory")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--n", type=int, default=128, help="samples of the throughput audit")
    parser.add_argument("--sizes", default="1000,10000", help="samples of the memory audits")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--memory-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the memory runs")
    parser.add_argument("--labels", default="predicted,random",
                        help="memory runs' labels: predicted (every sample attacked), random (about 10%%)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = args.part.split(",")
    print(f"# robustlab scale benchmark  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores)  torch {torch.__version__}  python {platform.python_version()}  model {args.model}")
    report: dict = {"model": args.model}
    with tempfile.TemporaryDirectory(prefix="robustlab-scale-") as tmp:
        folder = Path(tmp)
        if "throughput" in parts:
            t = throughput(folder, args.model, args.n, args.batch, args.steps)
            report["throughput"] = t
            print(f"\n## throughput: PGD-{t['steps']}, {t['n']} samples, batch {t['batch']}, each process 1 thread")
            print(f"1 process      {t['one_process_s']:8.2f} s  (wall {t['wall_one_s']:.1f} s)")
            print(f"2 gloo procs   {t['two_processes_s']:8.2f} s  (wall {t['wall_two_s']:.1f} s)")
            print(f"speed-up       {t['speedup']:8.2f}x  (target >= 1.8x)  samples.csv equal: {t['samples_equal']}")
        if "memory" in parts:
            sizes = [int(s) for s in args.sizes.split(",")]
            report["memory"] = []
            print(f"\n## peak RSS: PGD-{args.steps}, batch {args.memory_batch}, {args.threads} threads")
            print("labels     samples   inputs MiB   peak RSS MiB   x smallest   wall s")
            for labels in args.labels.split(","):  # predicted: every sample attacked; random: about 10%
                m = memory(folder, args.model, sizes, args.memory_batch, args.steps, args.threads, labels)
                report["memory"] += m
                for row in m:
                    print(f"{labels:9s}  {row['n']:7d}   {row['input_mb']:10.1f}   {row['peak_rss_mb']:12.0f}   "
                          f"{row['peak_rss_mb'] / m[0]['peak_rss_mb']:9.2f}x   {row['wall_s']:6.0f}")
                print(f"target: largest / smallest < 1.5x; {labels} labels: "
                      f"{m[-1]['peak_rss_mb'] / m[0]['peak_rss_mb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
