"""Throughput of ``omniseg segment`` on a batch: one process, two ``--shard`` processes, Ray with two actors.

    python benchmarks/batch_segment.py [--images 200] [--data ../shared/data/camvid] [--model camvid-deeplabv3plus-lite0]

The first ``--images`` CamVid train images by file name, listed in a manifest, are segmented end to
end as a user runs it: ``python -m omniseg segment MANIFEST --out DIR --quiet`` subprocesses, each
into its own fresh temporary folder, with the default outputs (overlay, labels, json). Timed from
the first process's start to the last one's exit, so model loading and Ray's start-up are counted.

* single: one process, 1 torch thread (``OMP_NUM_THREADS=1``);
* shard x2: ``--shard 0/2`` and ``--shard 1/2`` run concurrently into one folder, 1 thread each;
* ray x2: ``--engine ray --workers 2 --threads-per-worker 1`` (a local 2-CPU Ray cluster, started
  and stopped by the job: its start-up is counted);
* ray x2, running cluster: the same with ``--address auto`` against a cluster that
  ``ray start --head --num-cpus 2`` started before the clock (and ``ray stop`` ends after it), as a
  job on an existing cluster runs: Ray's own start is not counted, the actors' start still is.

Every run must write every image's label PNG, byte-identical to the single-process run's. Prints a
markdown table and, last, ``result: ratio_shard2=... ratio_ray2=... ratio_ray2_cluster=...`` (images/s over single's;
the goal on an otherwise idle machine with 2+ cores is >= 1.8).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # torch's intra-op threads follow OMP_NUM_THREADS


def run(commands: list[list[str]]) -> float:
    """Start ``commands`` together, wait for all; seconds from the first start to the last exit."""
    env = {**os.environ, **ONE_THREAD}
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - start
    for proc, err, command in zip(procs, errors, commands, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited with {proc.returncode}:\n{err}")
    return seconds


def ray_cluster(command: str) -> None:
    """``ray start --head`` / ``ray stop`` for the running-cluster row (outside the timed span)."""
    ray = Path(sys.executable).with_name("ray")
    args = [str(ray), command]
    if command == "start":
        args += ["--head", "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"]
    result = subprocess.run(args, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ray {command} exited with {result.returncode}:\n{result.stderr}")


def labels(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*_labels.png")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "camvid")
    parser.add_argument("--model", default="camvid-deeplabv3plus-lite0")
    args = parser.parse_args()

    images = sorted((args.data / "train").glob("*.png"))[: args.images]
    if len(images) < args.images:
        raise SystemExit(f"{args.data / 'train'}: {len(images)} images, fewer than --images {args.images}")
    with tempfile.TemporaryDirectory(prefix="batch_segment_") as tmp:
        tmp = Path(tmp)
        manifest = tmp / "images.txt"
        manifest.write_text("".join(f"{p.resolve()}\n" for p in images), encoding="utf-8")
        ray = ["--engine", "ray", "--workers", "2", "--threads-per-worker", "1"]
        segment = [sys.executable, "-m", "omniseg", "segment", str(manifest), "--model", args.model, "--quiet"]
        runs = {
            "single": [[*segment, "--out", str(tmp / "single")]],
            "shard x2": [[*segment, "--out", str(tmp / "shard"), "--shard", f"{i}/2"] for i in range(2)],
            "ray x2": [[*segment, "--out", str(tmp / "ray"), *ray]],
            "ray x2, running cluster": [[*segment, "--out", str(tmp / "ray_cluster"), *ray, "--address", "auto"]],
        }
        layout = {"single": (1, 1), "shard x2": (2, 1), "ray x2": (2, 1), "ray x2, running cluster": (2, 1)}
        seconds = {}
        for name, commands in runs.items():
            if name == "ray x2, running cluster":
                ray_cluster("start")
                try:
                    seconds[name] = run(commands)
                finally:
                    ray_cluster("stop")
            else:
                seconds[name] = run(commands)
            print(f"{name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
        reference = labels(tmp / "single")
        if len(reference) != len(images):
            raise SystemExit(f"single wrote {len(reference)} label PNGs for {len(images)} images")
        for name, folder in (("shard x2", "shard"), ("ray x2", "ray"), ("ray x2, running cluster", "ray_cluster")):
            if labels(tmp / folder) != reference:
                raise SystemExit(f"{name}: label PNGs differ from the single-process run's")

    rate = {name: len(images) / s for name, s in seconds.items()}
    print(f"{len(images)} CamVid train images ({args.data}), model {args.model}, outputs overlay,labels,json; "
          f"{os.cpu_count()} CPUs; every process or actor 1 torch thread; label PNGs identical across runs\n")  # fmt: skip
    print("| run | processes / actors | threads each | seconds | images/s | vs single |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        workers, threads = layout[name]
        print(f"| {name} | {workers} | {threads} | {seconds[name]:.1f} | {rate[name]:.2f} | {rate[name] / rate['single']:.2f}x |")
    print(f"result: ratio_shard2={rate['shard x2'] / rate['single']:.2f} ratio_ray2={rate['ray x2'] / rate['single']:.2f} "
          f"ratio_ray2_cluster={rate['ray x2, running cluster'] / rate['single']:.2f}")


if __name__ == "__main__":
    main()
