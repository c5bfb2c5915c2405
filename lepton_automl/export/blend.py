"""A blend's export folder: its members' export folders side by side (``member-<trial>/``), and a
``lepton.json`` of kind ``blend`` naming each member's weight and temperature.

A blend's members may read their inputs differently (images at 128 and 224 px, texts cut at 32 and
128 tokens), so each keeps its own ONNX file and preprocessing; ``Predictor`` runs them one after
another and returns the log of the weighted mean of their temperature-scaled class probabilities
(``search/blend.py``). The members' files are hard links where the file system allows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lepton_automl.exceptions import ExportError
from lepton_automl.export.artifact import BLEND_KIND as KIND
from lepton_automl.export.artifact import FORMAT_VERSION, METADATA, load_metadata


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_blend(directory: str | Path, *, members: Sequence[tuple[Path, int, float, float]], name: str,
                metrics: Mapping[str, Any], data: Mapping[str, Any] | None = None,
                search: Mapping[str, Any] | None = None) -> Path:
    """Write a blend folder. ``members``: (export folder, trial number, weight, temperature) each."""
    from lepton_automl import __version__

    out = Path(directory)
    work = out.with_name(out.name + f".partial{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        entries, metas = [], []
        for folder, trial, weight, temperature in members:
            meta = load_metadata(folder)
            sub = f"member-{trial:04d}"
            shutil.copytree(folder, work / sub, copy_function=_link_or_copy)
            entries.append({"path": sub, "trial": int(trial), "weight": float(weight),
                            "temperature": float(temperature)})
            metas.append(meta)
        classes = metas[0]["classes"]
        for meta, (folder, *_rest) in zip(metas[1:], members[1:]):
            if meta["classes"] != classes or meta["modality"] != metas[0]["modality"]:
                raise ExportError(f"{folder} predicts other classes or another modality than {members[0][0]}; "
                                  "only trials of one search can be blended")
        meta = {
            "format_version": FORMAT_VERSION, "lepton_version": __version__, "kind": KIND, "name": name,
            "modality": metas[0]["modality"], "classes": classes, "blend": entries,
            "backbone": metas[0]["backbone"],  # the heaviest-weighted member's, for tools that show one
            "params": {"blend": [e["trial"] for e in entries], "weights": [e["weight"] for e in entries]},
            "runtime": KIND, "runtime_file": None, "input_names": metas[0]["input_names"],
            "metrics": dict(metrics), **({"data": dict(data)} if data else {}),
            **({"search": dict(search)} if search else {}),
        }
        (work / "README.md").write_text(render_blend_card(meta, metas))
        (work / METADATA).write_text(json.dumps(meta, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def render_blend_card(meta: Mapping[str, Any], members: Sequence[Mapping[str, Any]]) -> str:
    m = meta["metrics"]

    def fmt(key: str, spec: str = ".4f") -> str:
        v = m.get(key)
        return "n/a" if v is None else format(v, spec)

    lines = ["---", "library_name: onnxruntime", "tags:", "- lepton-automl", f"- {meta['modality']}", "- onnx",
             "- ensemble", "---", "", f"# {meta['name']}", "",
             f"A blend of {len(members)} models from one Lepton search: each member runs on the input, "
             "its logits are divided by its temperature, and the class probabilities are averaged with "
             "the weights below. The weights were chosen greedily on the validation split (ensemble "
             "selection, Caruana et al., 2004), the temperatures by the validation log-loss.", "",
             "| member | trial | weight | temperature | backbone | validation accuracy | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for entry, member in zip(meta["blend"], members):
        mm = member.get("metrics", {})
        val, test = mm.get("accuracy"), mm.get("test_accuracy")
        lines.append(f"| `{entry['path']}` | {entry['trial']} | {entry['weight']:.3f} | {entry['temperature']:.3g} | "
                     f"{member['backbone']['name']} | {'n/a' if val is None else f'{val:.4f}'} | "
                     f"{'n/a' if test is None else f'{test:.4f}'} |")
    lines += ["", "## Metrics", "",
              f"- Objective accuracy: {fmt('accuracy')}, the most accurate trial's objective plus the blend's "
              "cross-fitted gain over it on the validation split (the scale the search's other trials are on)",
              f"- Validation accuracy of the blend: {fmt('holdout_accuracy')}, cross-fitted (chosen on one half "
              f"of the validation split, scored on the other, averaged over random halvings); the most accurate "
              f"trial's on the same examples: {fmt('best_single_accuracy')}",
              f"- Test accuracy: {fmt('test_accuracy')}",
              f"- Latency at batch 1: {fmt('latency_ms', '.3f')} ms, its members' measured latencies summed "
              "(they run one after another)",
              f"- Throughput: {fmt('throughput_per_s', '.1f')} examples/s",
              "", "Each member folder is a complete Lepton export with its own model card; "
              "`lepton predict`, `lepton serve` and `Predictor` run the blend folder as one model.", ""]
    return "\n".join(lines)
