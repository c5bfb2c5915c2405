"""The one loop that trains a whole network on raw examples: full fine-tuning and pruning recovery.

What it does, and where each piece comes from:
- AdamW with a linear warm-up then cosine decay (``transformers.get_scheduler``), the schedule of
  BERT fine-tuning and of AutoGluon's multimodal presets;
- layer-wise learning-rate decay (``layer_decay``): parameter groups from the input end of the
  network get geometrically smaller rates (Clark et al., ELECTRA, 2020; BEiT), so the pretrained
  lower layers move least;
- label smoothing (Szegedy et al., 2016), 0.1 by default;
- after each epoch, batch-norm statistics are re-estimated and the model is scored on
  ``validation``; the best epoch's weights are kept (validation-based early stopping).
Randomness (shuffling, dropout) comes from ``seed`` inside ``torch.random.fork_rng``: the caller's
global torch RNG is untouched, and the same seed reproduces the same weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton_automl.data.dataset import LabelledData
from lepton_automl.interfaces import Modality
from lepton_automl.log import get_logger
from lepton_automl.training.trainer import TrainingDiverged, recalibrate_batchnorm

logger = get_logger(__name__)


@dataclass(frozen=True)
class FineTuneConfig:
    epochs: int
    lr: float
    weight_decay: float = 0.01
    batch_size: int = 32
    warmup_fraction: float = 0.1  # of all steps
    schedule: str = "cosine"  # a transformers.get_scheduler name; "constant" for recovery
    label_smoothing: float = 0.1
    layer_decay: float | None = None  # e.g. 0.8: each earlier parameter group gets 0.8x the rate
    keep_best: bool = True  # restore the epoch with the best validation accuracy
    seed: int = 0
    class_weights: tuple[float, ...] | None = None
    calibration_examples: int = 512  # batch-norm re-estimation between epochs
    # Keep batch-norm statistics (and eval-mode normalisation) from pretraining. Fine-tuning from a
    # probe on the glyph set, re-estimated statistics moved the features under the probe's head:
    # validation fell from 0.49 to 0.18-0.28 after one epoch at any learning rate. Pruning recovery
    # needs the re-estimation (the channels changed), so it turns this off.
    freeze_batchnorm: bool = True


@dataclass
class FineTuneLog:
    curve: list[float] = field(default_factory=list)  # validation accuracy after each epoch
    best_epoch: int = 0
    seconds_per_epoch: list[float] = field(default_factory=list)


def _groups(model: nn.Module, cfg: FineTuneConfig) -> list[dict[str, Any]]:
    """One group per top-level child in forward order; with ``layer_decay``, rates fall towards the input.
    Biases and normalisation weights get no weight decay (the usual AdamW practice)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.layer_decay is None:
        depth = {n: 0 for n, _ in named}
        levels = 1
    else:
        # Depth by parameter order: forward order for the trunk -> tail -> head models built here.
        chunks = max(1, min(12, len(named) // 4))
        depth = {n: int(i * chunks / len(named)) for i, (n, _) in enumerate(named)}
        levels = chunks
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in named:
        level = depth[name]
        scale = 1.0 if cfg.layer_decay is None else cfg.layer_decay ** (levels - 1 - level)
        no_decay = p.ndim <= 1
        group = groups.setdefault((level, no_decay), {"params": [], "lr": cfg.lr * scale,
                                                      "weight_decay": 0.0 if no_decay else cfg.weight_decay})
        group["params"].append(p)
    return list(groups.values())


def fine_tune(
    model: nn.Module,
    modality: Modality,
    data: LabelledData,
    preprocessing: Mapping[str, Any],
    cfg: FineTuneConfig,
    *,
    validation: LabelledData | None = None,
    after_batch: Callable[[int], None] | None = None,
    after_epoch: Callable[[int, float | None], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> FineTuneLog:
    """Train ``model`` (in place, every parameter) on ``data``; return the validation curve.

    ``after_batch(epoch)`` runs after each step (deadline checks; it may raise to stop),
    ``after_epoch(epoch, validation_accuracy)`` after each epoch but the last (early stopping).
    """
    import time

    from transformers import get_scheduler

    log = FineTuneLog()
    examples, labels = data.examples, np.asarray(data.labels)
    names = modality.input_names()

    def batch(idx: Sequence[int], source: LabelledData = data) -> list[torch.Tensor]:
        feeds = modality.encode([source.examples[i] for i in idx], preprocessing=preprocessing)
        return [torch.from_numpy(feeds[n]) for n in names]

    def recalibrate(order: np.ndarray) -> None:
        subset = order[: cfg.calibration_examples]
        recalibrate_batchnorm(model, (batch(subset[s : s + 64]) for s in range(0, len(subset), 64)))

    for p in model.parameters():
        p.requires_grad_(True)
    steps_per_epoch = (len(examples) + cfg.batch_size - 1) // cfg.batch_size
    total = max(1, steps_per_epoch * cfg.epochs)
    weights = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, dtype=torch.float32)
    best_state, best_acc = None, -1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(_groups(model, cfg))
        sched = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", opt,
                              num_warmup_steps=int(cfg.warmup_fraction * total),
                              **({} if cfg.schedule == "constant" else {"num_training_steps": total}))
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            model.train()
            if cfg.freeze_batchnorm:
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            order = torch.randperm(len(examples), generator=gen).numpy()
            for k, s in enumerate(range(0, len(order), cfg.batch_size)):
                idx = order[s : s + cfg.batch_size]
                loss = nn.functional.cross_entropy(model(*batch(idx)), torch.as_tensor(labels[idx]),
                                                   weight=weights, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"training loss became {loss.item()} in epoch {epoch}; lower optim__lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if after_batch is not None:
                    after_batch(epoch)
                if progress is not None:
                    progress(f"fine-tuning epoch {epoch}/{cfg.epochs}", k + 1, steps_per_epoch)
            judged = validation is not None and len(validation) > 0
            if not cfg.freeze_batchnorm and (judged or (after_epoch is not None and epoch < cfg.epochs)):
                recalibrate(order)
            accuracy = None
            if judged:
                accuracy = evaluate_accuracy(model, modality, validation, preprocessing)
                log.curve.append(accuracy)
                if cfg.keep_best and accuracy > best_acc:
                    best_acc, log.best_epoch = accuracy, epoch
                    best_state = copy.deepcopy(model.state_dict())
            log.seconds_per_epoch.append(time.perf_counter() - start)
            if after_epoch is not None and epoch < cfg.epochs:
                after_epoch(epoch, accuracy)
    if best_state is not None and log.best_epoch != cfg.epochs:
        model.load_state_dict(best_state)
        logger.info("kept epoch %d of %d (validation accuracy %.4f)", log.best_epoch, cfg.epochs, best_acc)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if validation is None and not cfg.freeze_batchnorm:  # statistics over the whole training set
        recalibrate_batchnorm(model, (batch(range(s, min(s + 64, len(examples))))
                                      for s in range(0, len(examples), 64)))
    return log


def time_training_step(model: nn.Module, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any],
                       *, batch_size: int = 32, repeats: int = 2) -> float:
    """Seconds of one training step (encode, forward, backward) on a batch of ``data``, the best of
    ``repeats`` after one warm-up; no weight changes (gradients are discarded). Times the real thing
    rather than extrapolating from inference: on the man-page set a MiniLM epoch was predicted at 159 s
    from feature extraction and took 27 s."""
    import time

    names = modality.input_names()
    n = min(batch_size, len(data))
    feeds = modality.encode(list(data.examples[:n]), preprocessing=preprocessing)
    inputs = [torch.from_numpy(feeds[k]) for k in names]
    labels = torch.as_tensor(np.array(data.labels[:n], dtype=np.int64))
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # batch-norm statistics
    for p in model.parameters():
        p.requires_grad_(True)
    best = float("inf")
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()
            for i in range(repeats + 1):
                start = time.perf_counter()
                modality.encode(list(data.examples[:n]), preprocessing=preprocessing)
                nn.functional.cross_entropy(model(*inputs), labels).backward()
                if i:
                    best = min(best, time.perf_counter() - start)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.grad = None
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    return best


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, modality: Modality, data: LabelledData,
                      preprocessing: Mapping[str, Any], *, batch_size: int = 64) -> float:
    """Accuracy of the torch model on ``data`` (eval mode; running normalisation statistics)."""
    model.eval()
    names, correct = modality.input_names(), 0
    for s in range(0, len(data), batch_size):
        feeds = modality.encode(data.examples[s : s + batch_size], preprocessing=preprocessing)
        logits = model(*[torch.from_numpy(feeds[n]) for n in names])
        correct += int((logits.argmax(1).numpy() == np.asarray(data.labels[s : s + batch_size])).sum())
    return correct / max(1, len(data))
