"""Load test of `lepton serve` on loopback: concurrent clients, bounded in number and time, batching on and off.

    .venv/bin/python benchmarks/serve_load.py MODEL_DIR [--clients 8] [--seconds 20] [--inputs FILES...]

Starts the server twice (``--max-batch 32`` and ``--max-batch 1``) on a free loopback port, runs
``--clients`` threads that each send one-input requests for ``--seconds`` (then stop by themselves),
and writes requests/s and p50/p99 request latency beside the model's measured batch-1 latency to
``benchmarks/results/serve_load.json``. Inputs: image files, or texts for a text model (default: a
few generated ones).
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _payloads(model_dir: Path, inputs: list[str]) -> list[dict]:
    meta = json.loads((model_dir / "lepton.json").read_text())
    if meta["modality"] == "image":
        files = [Path(p) for p in inputs]
        if not files:
            raise SystemExit("pass some image files with --inputs for an image model")
        return [{"input": base64.b64encode(p.read_bytes()).decode()} for p in files]
    texts = inputs or ["the match ended with a late goal", "preheat the oven and add the flour",
                       "the kernel schedules each thread on a core", "a short text to classify"]
    return [{"input": t} for t in texts]


def run(model_dir: Path, *, max_batch: int, clients: int, seconds: float, payloads: list[dict]) -> dict:
    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lepton_automl.cli", "serve", str(model_dir), "--port", str(port),
                               "--max-batch", str(max_batch), "--max-wait-ms", "5"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.perf_counter() + seconds

        def client(index: int) -> None:
            with httpx.Client(timeout=30) as session:
                i = index
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    r = session.post(f"{url}/predict", json=payloads[i % len(payloads)])
                    dt = (time.perf_counter() - t0) * 1000
                    with lock:
                        if r.status_code == 200:
                            latencies.append(dt)
                        else:
                            errors[0] += 1
                    i += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        health = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat = np.asarray(latencies)
    return {"max_batch": max_batch, "clients": clients, "seconds": round(wall, 1), "requests": int(lat.size),
            "errors": errors[0], "requests_per_s": round(lat.size / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "model_calls": health["batches"], "mean_batch": round(health["examples"] / max(1, health["batches"]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--inputs", nargs="*", default=[])
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 300:
        raise SystemExit("keep --clients in 1..64 and --seconds in (0, 300]")
    payloads = _payloads(args.model_dir, args.inputs)
    meta = json.loads((args.model_dir / "lepton.json").read_text())
    runs = [run(args.model_dir, max_batch=b, clients=args.clients, seconds=args.seconds, payloads=payloads)
            for b in (32, 1)]
    result = {"model": meta.get("name"), "modality": meta["modality"], "runtime_file": meta.get("runtime_file"),
              "measured_latency_ms": meta["metrics"].get("latency_ms"),
              "machine": f"{platform.processor() or platform.machine()}, loopback", "runs": runs}
    out = HERE / "results" / "serve_load.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
