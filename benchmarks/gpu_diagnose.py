"""Where Lepton's GPU pipeline loses time against the limits of ``gpu_bench.py``: the ``diagnosis`` entry
of ``results/gpu_bench.json``.

- Images (efficientnet_lite0, 224 px, the glyph set repeated to 12,288): one core's decoding time per
  image; the decoding workers alone (no GPU), at the accelerator's worker count, unpinned, and at half
  the workers; ``run_trunk`` twice (the first pass pays for worker start-up and cuDNN's autotuning);
  the trunk on uint8 tensors already on the GPU (``decode_all``), twice: the most extraction could
  get once decoding is out of the way.
- Texts (a MiniLM-shaped BERT at 128 tokens, 24,576 joined man-page summaries): ``fine_tune`` run
  twice (the first also chooses kernels for each new sequence length); a plain training loop on one
  batch, Lepton's model and a bare ``BertModel``, with per-tensor (foreach) and fused AdamW; a torch
  profiler table of five of Lepton's steps (``OUT.prof.txt``).

    python benchmarks/gpu_diagnose.py OUT.json --tokenizer MINILM_TOKENIZER_DIR   # on a GPU machine
    python benchmarks/gpu_diagnose.py OUT.json --tokenizer DIR --smoke            # tiny, anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_bench as gb  # noqa: E402  (beside this file)


def main() -> None:
    from lepton_automl.accel import decode_all, encoded_batches, resolve_device
    from lepton_automl.backbones import BackboneCard, BackboneRegistry
    from lepton_automl.export.trunk import run_trunk
    from lepton_automl.interfaces import ExportModel
    from lepton_automl.training.finetune import FineTuneConfig, fine_tune
    from lepton_image import ImageModality
    from lepton_text import TextModality

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--tokenizer", required=True, help="a folder holding MiniLM's tokenizer files")
    parser.add_argument("--images", default=str(HERE / "data" / "glyphs"))
    parser.add_argument("--texts", default=str(HERE / "data" / "manpages.csv"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code, measures nothing")
    args = parser.parse_args()
    out = Path(args.out)
    result: dict[str, Any] = {}

    def record(key: str, value: Any) -> None:  # saved after every figure: a run cut short keeps them
        result[key] = value
        gb.log(f"{key}: {value}")
        out.write_text(json.dumps(result, indent=1) + "\n")

    accel = resolve_device("auto")
    n, batch = (256, 8) if args.smoke else (12_288, 256)
    registry = BackboneRegistry()
    image = ImageModality()
    data = gb.image_data(args, image, n)
    card = registry.get("efficientnet_lite0")
    prep = image.preprocessing(card, registry, params={"data__image_size": 224})
    some = list(data.examples[:256])
    image.encode_compact(some, preprocessing=prep)  # files into the page cache
    start = time.perf_counter()
    image.encode_compact(some, preprocessing=prep)
    record("decode_one_image_ms_one_core", round((time.perf_counter() - start) / len(some) * 1000, 3))
    for workers, pin in ((accel.workers, True), (accel.workers, False), (max(1, accel.workers // 2), True)):
        loader = dataclasses.replace(accel, workers=workers, pin_memory=pin)
        start, count = time.perf_counter(), 0
        for idx, _ in encoded_batches(image, data.examples, prep, batch_size=batch, accel=loader):
            count += len(idx)
        record(f"loader_alone_{workers}_workers_{'pinned' if pin else 'unpinned'}_per_s",
               round(count / (time.perf_counter() - start)))
    parts = image.build(card, registry, params={"data__image_size": 224}, pretrained=False)
    for k in (1, 2):
        accel.synchronize()
        start = time.perf_counter()
        run_trunk(parts.trunk, image, data.examples, preprocessing=prep, batch_size=batch, accel=accel)
        accel.synchronize()
        record(f"lite0_from_images_pass{k}_per_s", round(n / (time.perf_counter() - start)))
    decoded = decode_all(image, data.examples, prep, accel=accel, batch_size=batch)
    if decoded is not None and accel.cuda:
        trunk = parts.trunk
        accel.prepare(trunk)
        trunk.eval()
        for k in (1, 2):
            accel.synchronize()
            start = time.perf_counter()
            with torch.inference_mode(), accel.autocast(), accel.kernels(autotune=True):
                for s in range(0, n, batch):
                    trunk(*accel.model_inputs(image, decoded.batch(np.arange(s, min(n, s + batch))), prep))
            accel.synchronize()
            record(f"lite0_from_uint8_on_gpu_pass{k}_per_s", round(n / (time.perf_counter() - start)))
        trunk.to("cpu")

    text = TextModality()
    folder = Path(tempfile.mkdtemp(prefix="gpu-diagnose-minilm-"))
    for f in Path(args.tokenizer).iterdir():
        shutil.copy(f, folder / f.name)
    gb.minilm_shaped(None).save_pretrained(str(folder))
    mcard = registry.register(BackboneCard(name="minilm-shaped", ref=f"local-dir:{folder}", modality="text",
                                           max_length=gb.SEQ))
    texts = gb.text_data(args, 64 if args.smoke else 24_576)
    tprep = text.preprocessing(mcard, registry, params={"data__max_length": gb.SEQ})
    tparts = text.build(mcard, registry, params={"data__max_length": gb.SEQ}, pretrained=False)
    model = ExportModel(tparts.trunk, tparts.tail, nn.Linear(tparts.feature_dim, len(texts.classes)))
    for k in (1, 2):
        ft = fine_tune(model, text, texts, tprep, FineTuneConfig(epochs=2, lr=1e-4, batch_size=batch, seed=k),
                       accel=accel)
        record(f"minilm_fine_tune_run{k}_epoch_s", [round(s, 2) for s in ft.seconds_per_epoch])
    encode = text.encode_compact if accel.compact_transfer else text.encode
    feeds = encode(list(texts.examples[:batch]), preprocessing=tprep)
    inputs = accel.model_inputs(text, [torch.from_numpy(feeds[k]) for k in text.input_names()], tprep)
    target = torch.zeros(batch, dtype=torch.long, device=accel.device)

    def loop(net: nn.Module, fused: bool, steps: int = 2 if args.smoke else 20) -> int:
        accel.prepare(net)
        net.train()
        for p in net.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=fused if accel.cuda else None)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with accel.autocast():
                logits = gb._logits(net(*inputs))
            nn.functional.cross_entropy(logits.float(), target).backward()
            opt.step()

        for _ in range(3):
            step()
        accel.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        accel.synchronize()
        net.to("cpu")
        return round(steps * batch / (time.perf_counter() - start))

    for name, net in (("lepton_model", model), ("bert_model", gb.minilm_shaped(None))):
        for fused in (False, True):
            record(f"minilm_training_loop_{name}_{'fused' if fused else 'foreach'}_adamw_per_s", loop(net, fused))
    if accel.cuda:
        from torch.profiler import ProfilerActivity, profile

        accel.prepare(model)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                opt.zero_grad(set_to_none=True)
                with accel.autocast():
                    logits = model(*inputs)
                nn.functional.cross_entropy(logits.float(), target).backward()
                opt.step()
            accel.synchronize()
        Path(f"{out}.prof.txt").write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
