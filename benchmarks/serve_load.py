"""Load test of ``omniseg serve``: concurrent clients against the service on loopback, compared
with the in-process :class:`~omniseg.predictor.Predictor` measured in the same run.

    python benchmarks/serve_load.py [--duration 60] [--clients 32] [--model camvid-deeplabv3plus-lite0]

Steps: the in-process throughput (``Predictor.predict`` on the image, one after another); the
service started as a subprocess (``python -m omniseg serve`` on a free 127.0.0.1 port) and warmed
with one full batch; ``--clients`` clients posting the image for ``--duration`` seconds (at most
``--max-requests`` requests; requests in flight at the deadline are waited for, up to
``--drain-timeout``); the in-process throughput again (the machine may be shared: the reference is
the mean of before and after). Every answer is checked against the in-process JSON of the image.

Prints a markdown table and, last, ``result: ratio_throughput=... errors=... p99_ms=... rss_growth=...``.
Traffic goes to 127.0.0.1 only; the script stops the server and exits by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from omniseg.io import load_image
from omniseg.predictor import DEFAULT_MODEL, load_predictor, segments_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / "assets" / "camvid_0016E5_07959.png"
HOST = "127.0.0.1"  # loopback only, whatever the arguments


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def in_process_throughput(predictor, image: np.ndarray, seconds: float, min_images: int = 3) -> float:
    """Images per second of ``predictor.predict`` run back to back for about ``seconds``."""
    predictor.predict(image)  # warm-up, not timed
    n, start = 0, time.perf_counter()
    while n < min_images or time.perf_counter() - start < seconds:
        predictor.predict(image, score_thresh=0.5)
        n += 1
    return n / (time.perf_counter() - start)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} while starting")
            try:
                if client.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


def same_answer(got: dict, want: dict, score_tol: float = 1e-5) -> bool:
    """Equal JSON, except scores within ``score_tol``: a batch of 4 may round a segment's mean
    confidence differently from a batch of 1 (seen: 6e-8); masks, areas and boxes must be equal."""
    if {k: v for k, v in got.items() if k != "segments"} != {k: v for k, v in want.items() if k != "segments"}:
        return False
    if len(got["segments"]) != len(want["segments"]):
        return False
    for a, b in zip(got["segments"], want["segments"], strict=True):
        if {**a, "score": 0} != {**b, "score": 0} or abs(a["score"] - b["score"]) > score_tol:
            return False
    return True


async def sample_rss(pid: int, out: list[int], every: float = 10.0) -> None:
    """Append the server's RSS every ``every`` seconds: growth that levels off is the allocator
    settling, growth that keeps climbing is a leak."""
    while True:
        out.append(rss_bytes(pid))
        await asyncio.sleep(every)


async def load(
    url: str, body: bytes, reference: dict, *, clients: int, duration: float, max_requests: int, drain_timeout: float,
    server_pid: int | None = None,
) -> dict:
    """``clients`` clients posting ``body`` until ``duration`` passed or ``max_requests`` were sent."""
    latencies: list[float] = []
    errors: list[str] = []
    mismatches = 0
    sent = 0
    start = time.perf_counter()
    last_done = start
    params = {"model": reference["model"]}
    headers = {"content-type": "image/png"}
    rss_samples: list[int] = []

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent, mismatches, last_done
        while time.perf_counter() - start < duration and sent < max_requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/segment", params=params, content=body, headers=headers)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            last_done = time.perf_counter()
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                continue
            latencies.append(last_done - t0)
            if not same_answer(r.json(), reference):
                mismatches += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    # trust_env=False: no proxy from the environment, the traffic stays on loopback
    async with httpx.AsyncClient(trust_env=False, timeout=duration + drain_timeout, limits=limits) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(clients)]
        sampler = asyncio.create_task(sample_rss(server_pid, rss_samples)) if server_pid else None
        done, pending = await asyncio.wait(tasks, timeout=duration + drain_timeout)
        for task in pending:  # still waiting after the drain timeout: counted as errors
            task.cancel()
            errors.append("no answer within the drain timeout")
        if sampler:
            sampler.cancel()
    return {
        "sent": sent, "latencies": latencies, "errors": errors, "mismatches": mismatches,
        "elapsed": last_done - start, "rss_samples": rss_samples,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (new requests stop after it)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=5000, help="bound on the requests sent")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--model-batch", default="auto", help="images per model call (the service's default: auto)")
    parser.add_argument("--baseline-seconds", type=float, default=None, help="per in-process phase (default: duration / 4)")
    parser.add_argument("--drain-timeout", type=float, default=240.0, help="wait for in-flight requests after the load")
    args = parser.parse_args(argv)
    baseline_s = args.baseline_seconds if args.baseline_seconds is not None else max(5.0, args.duration / 4)

    image = load_image(args.image)
    body = args.image.read_bytes()
    predictor = load_predictor(args.model)
    reference = segments_json(predictor.predict(image, score_thresh=0.5), image_path="upload", model=predictor.name)
    before = in_process_throughput(predictor, image, baseline_s)
    print(f"in-process before: {before:.3f} img/s", file=sys.stderr)

    port = free_port()
    url = f"http://{HOST}:{port}"
    log = tempfile.NamedTemporaryFile(prefix="omniseg-serve-", suffix=".log", delete=False)
    command = [
        sys.executable, "-m", "omniseg", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--model-batch", args.model_batch,
        "--max-in-flight", str(max(args.clients, 32)),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_PROXY": "*"})
    try:
        wait_ready(url, proc, timeout=300)
        rss_ready = rss_bytes(proc.pid)
        served = httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()["models"][0]
        # one full batch first: the allocator's high-water mark for a batch is not growth under load
        warm = asyncio.run(
            load(url, body, reference, clients=args.max_batch, duration=args.drain_timeout,
                 max_requests=args.max_batch, drain_timeout=args.drain_timeout)
        )  # fmt: skip
        rss_start = rss_bytes(proc.pid)
        print(f"server ready (warm-up: {len(warm['latencies'])} ok); load for {args.duration:.0f} s", file=sys.stderr)
        result = asyncio.run(
            load(url, body, reference, clients=args.clients, duration=args.duration,
                 max_requests=args.max_requests, drain_timeout=args.drain_timeout, server_pid=proc.pid)
        )  # fmt: skip
        rss_end = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    after = in_process_throughput(predictor, image, baseline_s)
    print(f"in-process after: {after:.3f} img/s", file=sys.stderr)

    reference_rate = (before + after) / 2
    ok = len(result["latencies"])
    rate = ok / result["elapsed"] if result["elapsed"] > 0 else 0.0
    lat_ms = np.asarray(result["latencies"]) * 1000 if ok else np.asarray([float("nan")])
    p50, p99 = np.percentile(lat_ms, 50), np.percentile(lat_ms, 99)
    errors = len(result["errors"])
    growth = (rss_end - rss_start) / rss_start
    mb = 2**20
    rows = [
        ("model / image", f"{args.model} / {args.image.name} ({image.shape[1]}x{image.shape[0]})"),
        ("clients / duration / max batch / max wait", f"{args.clients} / {args.duration:.0f} s / {args.max_batch} / {args.max_wait_ms:g} ms"),
        ("model batch chosen (seconds per image measured at warm-up, by call size)",
         f"{served['model_batch']} ({', '.join(f'{k}: {v:.3f}' for k, v in served['seconds_per_image_by_batch'].items())})"),
        ("in-process Predictor, before / after / mean", f"{before:.3f} / {after:.3f} / {reference_rate:.3f} img/s"),
        ("service throughput", f"{rate:.3f} req/s ({ok} ok in {result['elapsed']:.1f} s, {result['sent']} sent)"),
        ("ratio service / in-process", f"{rate / reference_rate:.3f}"),
        ("latency p50 / p99", f"{p50:.0f} / {p99:.0f} ms"),
        ("errors / answers differing from the in-process JSON (scores to 1e-5)", f"{errors} / {result['mismatches']}"),
        ("server RSS at ready / after warm-up batch / end", f"{rss_ready / mb:.0f} / {rss_start / mb:.0f} / {rss_end / mb:.0f} MB"),
        ("server RSS every 10 s under load", " ".join(f"{r / mb:.0f}" for r in result["rss_samples"]) + " MB"),
        ("RSS growth under load (end / after warm-up - 1)", f"{growth:+.3%}"),
    ]  # fmt: skip
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for error in result["errors"][:5]:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"server log: {log.name}", file=sys.stderr)
    else:
        os.unlink(log.name)
    print(f"result: ratio_throughput={rate / reference_rate:.3f} errors={errors} p99_ms={p99:.0f} rss_growth={growth:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
