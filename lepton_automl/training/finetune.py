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
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton_automl.accel import CPU, Accelerator, DecodedSet, decode_all, encoded_batches
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
    validation_correct: list[np.ndarray] = field(default_factory=list)  # per epoch: which examples it got right
    best_epoch: int = 0
    seconds_per_epoch: list[float] = field(default_factory=list)
    micro_batch: int = 0  # the largest piece of a batch that fit in memory (the batch, unless a GPU ran out)


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
    after_epoch: Callable[[int, float | None], bool | None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    accel: Accelerator = CPU,
) -> FineTuneLog:
    """Train ``model`` (in place, every parameter) on ``data``; return the validation curve.

    ``after_batch(epoch)`` runs after each step (deadline checks; it may raise to stop),
    ``after_epoch(epoch, validation_accuracy)`` after each epoch but the last (early stopping: it may
    raise; or it returns True to end training there, keeping the best epoch so far).
    On a CUDA ``accel`` the model trains there (mixed precision, channels-last, decoded data kept in
    memory when it fits) and comes back to the device it came from. A step that runs out of GPU
    memory is retried in halves with gradient accumulation, so ``cfg.batch_size`` (a hyperparameter)
    never changes; the largest piece that fit is ``FineTuneLog.micro_batch``.
    """
    home = _device_of(model)
    accel.prepare(model)
    try:
        return _fine_tune(model, modality, data, preprocessing, cfg, validation=validation, after_batch=after_batch,
                          after_epoch=after_epoch, progress=progress, accel=accel)
    finally:  # also when a deadline, early stopping or divergence ends training
        model.to(home, memory_format=torch.contiguous_format)


def _fine_tune(model: nn.Module, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any],
               cfg: FineTuneConfig, *, validation: LabelledData | None,
               after_batch: Callable[[int], None] | None,
               after_epoch: Callable[[int, float | None], bool | None] | None,
               progress: Callable[[str, int, int], None] | None, accel: Accelerator) -> FineTuneLog:
    """``fine_tune`` on a model already on ``accel``'s device."""
    import time

    from transformers import get_scheduler

    log = FineTuneLog(micro_batch=cfg.batch_size)
    examples, labels = data.examples, np.asarray(data.labels)
    rank = length_rank(modality, examples)
    decoded = decode_all(modality, examples, preprocessing, accel=accel)
    decoded_val = (decode_all(modality, validation.examples, preprocessing, accel=accel)
                   if decoded is not None and validation is not None and len(validation) else None)

    def batches(order: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        if decoded is not None:
            for s in range(0, len(order), size):
                idx = order[s : s + size]
                yield idx, accel.model_inputs(modality, decoded.batch(idx), preprocessing)
        else:
            for idx, tensors in encoded_batches(modality, examples, preprocessing, batch_size=size, accel=accel,
                                                order=order):
                yield idx, accel.model_inputs(modality, tensors, preprocessing)

    def recalibrate(order: np.ndarray) -> None:
        recalibrate_batchnorm(model, (inputs for _, inputs in batches(order[: cfg.calibration_examples], 64)))

    for p in model.parameters():
        p.requires_grad_(True)
    steps_per_epoch = (len(examples) + cfg.batch_size - 1) // cfg.batch_size
    total = max(1, steps_per_epoch * cfg.epochs)
    weights = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, dtype=torch.float32,
                                                                   device=accel.device)
    scaler = accel.grad_scaler()
    check_every = 8 if accel.cuda else 1  # a finiteness check waits for the GPU: not after every step

    def step(inputs: list[torch.Tensor], target: torch.Tensor, epoch: int) -> torch.Tensor:
        """Gradients of one batch, in pieces of ``log.micro_batch`` (halved on out-of-memory errors)."""
        while True:
            try:
                opt.zero_grad(set_to_none=True)
                n, total_loss = len(target), torch.zeros((), device=target.device)
                for s in range(0, n, log.micro_batch):
                    part = slice(s, s + log.micro_batch)
                    with accel.autocast():
                        logits = model(*[t[part] for t in inputs])
                    loss = nn.functional.cross_entropy(logits.float(), target[part], weight=weights,
                                                       label_smoothing=cfg.label_smoothing) * (len(target[part]) / n)
                    scaler.scale(loss).backward()
                    total_loss += loss.detach()
                return total_loss
            except torch.OutOfMemoryError:
                if log.micro_batch <= 1:
                    raise
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                log.micro_batch //= 2
                logger.warning("a training batch did not fit in GPU memory in epoch %d; accumulating "
                               "gradients over pieces of %d examples", epoch, log.micro_batch)

    best_state, best_acc = None, -1.0
    # Autotuning convolutions costs seconds per input shape: only worth it for long runs.
    with torch.random.fork_rng(devices=[]), accel.kernels(autotune=total >= 500):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        # Fused AdamW on a GPU: one kernel for every parameter's update. The per-tensor (foreach) step
        # took a quarter of a MiniLM training step's GPU time on an H200 (batch 256, 128 tokens); fused,
        # a plain training loop ran 7.2k -> 10.8k sequences/s.
        opt = torch.optim.AdamW(_groups(model, cfg), fused=True if accel.cuda else None)
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
            order = length_grouped(torch.randperm(len(examples), generator=gen).numpy(), rank, cfg.batch_size)
            for k, (idx, inputs) in enumerate(batches(order, cfg.batch_size)):
                target = torch.as_tensor(labels[idx]).to(accel.device, non_blocking=accel.pin_memory)
                loss = step(inputs, target, epoch)
                if (k + 1) % check_every == 0 or k + 1 == steps_per_epoch:
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"training loss became {loss.item()} in epoch {epoch}; "
                                               "lower optim__lr")
                scaler.step(opt)
                scaler.update()
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
                right = evaluate_correct(model, modality, validation, preprocessing, accel=accel, decoded=decoded_val)
                accuracy = float(right.mean())
                log.curve.append(accuracy)
                log.validation_correct.append(right)
                if cfg.keep_best and accuracy > best_acc:
                    best_acc, log.best_epoch = accuracy, epoch
                    best_state = copy.deepcopy(model.state_dict())
            accel.synchronize()
            log.seconds_per_epoch.append(time.perf_counter() - start)
            if after_epoch is not None and epoch < cfg.epochs and after_epoch(epoch, accuracy):
                break  # the caller ends training here (its time): the best epoch so far is kept
    ran = len(log.seconds_per_epoch)
    if best_state is not None and log.best_epoch != ran:
        model.load_state_dict(best_state)
        logger.info("kept epoch %d of %d (validation accuracy %.4f)", log.best_epoch, ran, best_acc)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if validation is None and not cfg.freeze_batchnorm:  # statistics over the whole training set
        recalibrate(np.arange(len(examples)))
    return log


# A shuffled epoch is cut into groups of this many batches, each group sorted by length, so that a
# batch's examples are alike in length (a text batch is padded to its longest). On the man-page
# training set (128 tokens, batches of 32), the tokens run: 4.0x the real ones shuffled, 1.9x
# grouped by 16 batches, 1.7x sorted whole (transformers' group_by_length groups by 50).
LENGTH_GROUP_BATCHES = 16


def length_rank(modality: Modality, examples: Any) -> np.ndarray | None:
    """Each example's place in the modality's ``batch_order`` (None when it keeps the given order)."""
    order = modality.batch_order(examples)
    if order is None:
        return None
    rank = np.empty(len(examples), dtype=np.int64)
    rank[np.asarray(order)] = np.arange(len(examples))
    return rank


def length_grouped(order: np.ndarray, rank: np.ndarray | None, batch_size: int) -> np.ndarray:
    """``order`` (a shuffled epoch) with each run of ``LENGTH_GROUP_BATCHES`` batches sorted by
    ``rank``: batches still drawn at random, each of alike examples. As given when ``rank`` is None."""
    if rank is None or not len(order):
        return order
    group = LENGTH_GROUP_BATCHES * batch_size
    return np.concatenate([chunk[np.argsort(rank[chunk], kind="stable")]
                           for chunk in (order[s : s + group] for s in range(0, len(order), group))])


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def typical_batch(modality: Modality, examples: Any, preprocessing: Mapping[str, Any], *, batch_size: int,
                  seed: int = 0) -> tuple[np.ndarray, float]:
    """The rows of a training batch to time a step on, and what an epoch's mean batch costs against it.

    A text batch is padded to its longest text, and ``fine_tune`` draws batches of alike lengths
    (``length_grouped``): the first ``batch_size`` rows of the set are no guide. On the man-page
    training set they were padded to 64 tokens at ``max_length`` 64, where the length-grouped batches
    averaged 18: 3.5x the mean batch's tokens (5.8x at 128, 7.8x at 256), and a MiniLM epoch was
    predicted at 202 s from them (69-78 s measured).
    Here one epoch's batches are drawn as ``fine_tune`` draws them and encoded (tokenizing is cheap):
    the full batch whose size (encoded values, padding included) is nearest their mean is returned,
    with the ratio of the mean to its size, which scales the step timed on it to the epoch's mean
    step. A modality whose batches all cost alike (no ``batch_order``: images) gets the first rows and 1."""
    n = len(examples)
    rank = length_rank(modality, examples)
    if rank is None or n <= batch_size:
        return np.arange(min(batch_size, n)), 1.0
    order = length_grouped(np.random.default_rng(seed).permutation(n), rank, batch_size)
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    sizes = np.array([sum(v.size for v in modality.encode([examples[i] for i in rows],
                                                          preprocessing=preprocessing).values())
                      for rows in batches], dtype=np.float64)
    full = [i for i, rows in enumerate(batches) if len(rows) == batch_size]
    chosen = min(full, key=lambda i: abs(sizes[i] - sizes.mean()))
    return np.sort(batches[chosen]), float(sizes.mean() / sizes[chosen])


def time_training_step(model: nn.Module, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any],
                       *, batch_size: int = 32, repeats: int = 2, accel: Accelerator = CPU,
                       rows: Any = None) -> float:
    """Seconds of one training step (encode, forward, backward, AdamW's update) on a batch of ``data``
    (its ``rows``; the first ``batch_size`` by default: see ``typical_batch``), the median of
    ``repeats`` after one warm-up; no weight changes (gradients are discarded). Times the real thing
    rather than extrapolating from inference: on the man-page set a MiniLM epoch was predicted at
    159 s from feature extraction and took 27 s. On a GPU the step runs there, in mixed precision; encoding is
    left out of the time (worker processes do it while the GPU computes)."""
    import time

    names = modality.input_names()
    rows = np.arange(min(batch_size, len(data))) if rows is None else np.asarray(rows)
    batch = [data.examples[i] for i in rows]
    feeds = modality.encode(batch, preprocessing=preprocessing)
    home = _device_of(model)
    accel.prepare(model)
    inputs = accel.inputs([torch.from_numpy(feeds[k]) for k in names])
    labels = torch.as_tensor(np.asarray(data.labels)[rows].astype(np.int64)).to(accel.device)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # batch-norm statistics
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    # The optimizer's step is timed on copies of the weights, which take the gradients: AdamW over
    # MiniLM's 23M parameters took 0.2 s of a 1.3-s step on 2 cores.
    copies = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(copies, lr=1e-6)
    seconds = []
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()
            for i in range(repeats + 1):
                start = time.perf_counter()
                for p in params:
                    p.grad = None  # as fine_tune's zero_grad(set_to_none=True): allocated anew each step
                if not accel.cuda:
                    modality.encode(batch, preprocessing=preprocessing)
                with accel.autocast():
                    logits = model(*inputs)
                nn.functional.cross_entropy(logits.float(), labels).backward()
                for twin, p in zip(copies, params):
                    twin.grad = p.grad
                optimizer.step()
                accel.synchronize()
                if i:
                    seconds.append(time.perf_counter() - start)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.grad = None
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
        model.to(home, memory_format=torch.contiguous_format)
    return float(np.median(seconds))


def evaluate_accuracy(model: nn.Module, modality: Modality, data: LabelledData,
                      preprocessing: Mapping[str, Any], *, batch_size: int = 64, accel: Accelerator = CPU,
                      decoded: DecodedSet | None = None) -> float:
    """Accuracy of the torch model on ``data`` (eval mode; running normalisation statistics), computed
    on the device the model is on (``decoded``: ``data`` already decoded)."""
    if not len(data):
        return 0.0
    return float(evaluate_correct(model, modality, data, preprocessing, batch_size=batch_size, accel=accel,
                                  decoded=decoded).mean())


@torch.no_grad()
def evaluate_correct(model: nn.Module, modality: Modality, data: LabelledData,
                     preprocessing: Mapping[str, Any], *, batch_size: int = 64, accel: Accelerator = CPU,
                     decoded: DecodedSet | None = None) -> np.ndarray:
    """Which examples of ``data`` the torch model gets right (bool per example); as ``evaluate_accuracy``.
    Batches follow the modality's ``batch_order``: a text batch is padded to its longest text, and a
    fine-tuning's validation pass after every epoch ran on batches of texts as they came."""
    model.eval()
    device = _device_of(model)
    on_device = dataclasses.replace(accel, device=str(device))  # accel's settings, where the model is
    labels = np.asarray(data.labels)
    right = np.zeros(len(data), dtype=bool)
    given = modality.batch_order(data.examples)
    order = np.arange(len(data)) if given is None else np.asarray(given, dtype=np.int64)
    if decoded is not None:
        parts: Iterable[tuple[np.ndarray, list[torch.Tensor]]] = (
            (idx, decoded.batch(idx)) for idx in np.array_split(order, max(1, -(-len(data) // batch_size))))
    else:
        parts = encoded_batches(modality, data.examples, preprocessing, batch_size=batch_size, accel=on_device,
                                order=order)
    for idx, tensors in parts:
        with on_device.autocast():
            logits = model(*on_device.model_inputs(modality, tensors, preprocessing))
        right[idx] = logits.argmax(1).cpu().numpy() == labels[idx]
    return right
