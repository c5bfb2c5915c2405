"""`lepton serve` and `lepton predict --out`: a real export behind the real FastAPI app (in process, and in a
real uvicorn subprocess for the fuzzing test), answering what the Predictor answers, with JSON errors."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.cli import app as cli
from lepton_automl.export.artifact import Predictor
from lepton_automl.interfaces import InputLimits
from lepton_automl.search.probe_export import materialize
from lepton_automl.serving.app import ServeLimits, create_app
from lepton_automl.serving.batcher import MicroBatcher
from lepton_image import ImageModality
from lepton_text import TextModality
from tests.test_pruning_in_search import _runner, _tiny_text_runner


@pytest.fixture(scope="module")
def image_export(image_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-img")
    modality = ImageModality()
    runner = _runner(modality, modality.load(image_folder), BackboneRegistry(), root, "efficientnet_lite0")
    runner.evaluate({"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "probe",
                     "prune__method": "none", "quant__mode": "none"}, trial_dir=root / "model", seed=0)
    return materialize(root / "model", modality=modality, registry=runner.registry)


@pytest.fixture(scope="module")
def text_export(text_csv, tiny_bert_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-txt")
    modality = TextModality()
    runner = _tiny_text_runner(modality, text_csv, tiny_bert_dir, root)
    runner.evaluate({"backbone": "tiny", "data__max_length": 32, "train__mode": "probe", "prune__method": "none",
                     "quant__mode": "none"}, trial_dir=root / "model", seed=0)
    return materialize(root / "model", modality=modality, registry=runner.registry)


def _images(folder: Path, n: int) -> list[Path]:
    return sorted(folder.rglob("*.png"))[:n]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_json_and_multipart_predictions_match_the_predictor(image_export, image_folder) -> None:
    files = _images(image_folder, 12)[::2]
    expected = Predictor(image_export).predict([str(p) for p in files])
    with TestClient(create_app(image_export)) as client:
        assert client.get("/health").json()["status"] == "ok"
        meta = client.get("/metadata").json()
        assert meta["classes"] == Predictor(image_export).classes
        assert meta["metrics"]["latency_ms"] == json.loads((image_export / "lepton.json").read_text())["metrics"]["latency_ms"]
        answer = client.post("/predict", json={"inputs": [_b64(p) for p in files], "top_k": 2}).json()
        assert [p["label"] for p in answer["predictions"]] == expected
        for p in answer["predictions"]:
            probs = [t["probability"] for t in p["top_k"]]
            assert len(probs) == 2 and probs == sorted(probs, reverse=True) and p["top_k"][0]["label"] == p["label"]
            assert 0 < sum(probs) <= 1.0 + 1e-5
        one = client.post("/predict", json={"input": "data:image/png;base64," + _b64(files[0])}).json()
        assert one["predictions"][0]["label"] == expected[0] and len(one["predictions"][0]["top_k"]) == 3
        uploaded = client.post("/predict", files=[("file", (p.name, p.read_bytes(), "image/png")) for p in files])
        assert uploaded.status_code == 200 and [p["label"] for p in uploaded.json()["predictions"]] == expected


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's shape), with valid checksums."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_every_bad_request_is_a_json_error_that_names_the_problem(image_export, image_folder) -> None:
    png = _images(image_folder, 1)[0]
    limits = ServeLimits(max_request_bytes=200_000, max_inputs=4, inputs=InputLimits(max_pixels=10_000))
    cases = [
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "not accepted"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(json=[1, 2]), 400, "must be an object"),
        (dict(json={"inputs": [_b64(png)], "colour": "red"}), 422, "unknown field"),
        (dict(json={"inputs": _b64(png)}), 422, "must be a list"),
        (dict(json={"inputs": [3]}), 422, "must be a string"),
        (dict(json={"inputs": []}), 400, "no inputs"),
        (dict(json={"inputs": ["%%% not base64"]}), 400, "not valid base64"),
        (dict(json={"inputs": [base64.b64encode(b"GIF89a garbage").decode()]}), 400, "not a readable image"),
        (dict(json={"inputs": [_b64(png)] * 5}), 413, "the limit is 4"),
        (dict(json={"inputs": [_b64(png)], "top_k": 9}), 422, "between 1 and 3"),
        (dict(json={"inputs": [_b64(png)], "top_k": "two"}), 422, "whole number"),
        (dict(json={"inputs": [base64.b64encode(_png_header_only(100_000, 100_000)).decode()]}), 413, "pixels"),
        (dict(content=b"x" * 300_000, headers={"content-type": "application/json"}), 413, "limit"),
        (dict(content=b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nabc",
              headers={"content-type": "multipart/form-data; boundary=b"}), 400, ""),
        (dict(data={"colour": "red"}, files=[("file", ("a.png", png.read_bytes(), "image/png"))]), 422, "unknown form field"),
    ]
    with TestClient(create_app(image_export, limits=limits)) as client:
        big = Image.new("RGB", (200, 200), (255, 0, 0))
        buffer = io.BytesIO()
        big.save(buffer, format="PNG")
        cases.append((dict(json={"inputs": [base64.b64encode(buffer.getvalue()).decode()]}), 413, "40,000 pixels"))
        for kwargs, status, words in cases:
            response = client.post("/predict", **kwargs)
            body = response.json()
            assert response.status_code == status, (kwargs.keys(), response.text)
            assert body["error"]["status"] == status and words in body["error"]["message"], body
        assert client.get("/nowhere").json()["error"]["status"] == 404
        assert client.get("/health").status_code == 200  # still serving


def test_a_text_model_serves_texts_within_the_length_limit(text_export) -> None:
    limits = ServeLimits(inputs=InputLimits(max_text_chars=200))
    texts = ["the team scored a late goal", "bake the flour in the oven", "the kernel thread cache"]
    expected = Predictor(text_export).predict(texts)
    with TestClient(create_app(text_export, limits=limits)) as client:
        answer = client.post("/predict", json={"inputs": texts, "top_k": 1}).json()
        assert [p["label"] for p in answer["predictions"]] == expected
        too_long = client.post("/predict", json={"input": "goal " * 100})
        assert too_long.status_code == 413 and "500 characters" in too_long.json()["error"]["message"]
        assert client.post("/predict", json={"input": "   "}).status_code == 400


def test_the_batcher_runs_concurrent_requests_as_one_batch() -> None:
    calls: list[int] = []

    def run(examples: list) -> np.ndarray:
        calls.append(len(examples))
        return np.array([[float(e), -float(e)] for e in examples])

    async def scenario(max_batch: int) -> list[np.ndarray]:
        batcher = MicroBatcher(run, max_batch=max_batch, max_wait_ms=500)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(5)))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario(max_batch=64))
    assert calls == [10]  # five requests of two, one model call
    assert [r[:, 0].tolist() for r in results] == [[float(i), float(i + 100)] for i in range(5)]
    calls.clear()
    asyncio.run(scenario(max_batch=1))
    assert calls == [2] * 5  # batching off: one call per request


def test_predict_writes_a_csv_of_probabilities_for_a_folder(image_export, image_folder, tmp_path) -> None:
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(cli, ["predict", str(image_export), str(image_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    files = sorted(str(p) for p in Path(image_folder).rglob("*.png"))
    assert [r["input"] for r in rows] == files
    predictor = Predictor(image_export)
    assert [r["label"] for r in rows] == predictor.predict(files)
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in predictor.classes]
        assert abs(sum(probs) - 1) < 1e-4 and r["label"] == predictor.classes[int(np.argmax(probs))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def test_a_real_server_survives_fuzzing(image_export, image_folder) -> None:
    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lepton_automl.cli", "serve", str(image_export), "--port",
                               str(port), "--max-request-mb", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the server did not start: {server.stderr.read()[-2000:] if server.poll() is not None else ''}")
        rng = np.random.default_rng(0)
        png = _images(image_folder, 1)[0].read_bytes()
        statuses = []
        for i in range(120):
            body = rng.bytes(int(rng.integers(0, 4096)))
            kind = ["application/json", "multipart/form-data; boundary=xyz", "image/png", ""][i % 4]
            if i % 5 == 0:  # a real upload cut short
                body = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                        b"Content-Type: image/png\r\n\r\n" + png[: int(rng.integers(1, len(png)))])
            r = httpx.post(f"{url}/predict", content=body, headers={"content-type": kind} if kind else {}, timeout=30)
            statuses.append(r.status_code)
            assert r.status_code < 500 and "error" in r.json(), r.text
        huge = httpx.post(f"{url}/predict", content=b"x" * (2 * 2**20), headers={"content-type": "application/json"})
        assert huge.status_code == 413
        # Raw bytes below HTTP: garbage, a huge header, a request line that never ends.
        for payload in (rng.bytes(5000), b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
                        b"GET /" + b"a" * 100_000):
            answer = _raw(port, payload)
            assert not answer or answer.split(b" ")[1][:1] == b"4", answer[:200]
        assert httpx.get(f"{url}/health").status_code == 200  # still alive, still answering
        assert set(statuses) <= {400, 413, 415, 422}
    finally:
        server.terminate()
        server.wait(timeout=30)
