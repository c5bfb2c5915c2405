"""Where tensors run: the device a user picks (``--device auto|cpu|cuda[:N]``) and how work uses it.

An ``Accelerator`` is a frozen description, made once by ``resolve_device`` and passed down to
feature extraction, fine-tuning and latency measurement; nothing here changes global torch settings.

On a CUDA GPU:
- mixed precision: bf16 autocast where the GPU supports it (Ampere and newer), else fp16 with a
  gradient scaler;
- ``channels_last`` memory format for convolutional networks (tensor cores read NHWC);
- examples are decoded (``Modality.encode``) in DataLoader worker processes, into pinned memory, so
  the GPU does not wait on PIL or the tokenizer; for multi-epoch training the decoded training set
  is kept in memory when it fits (``cache_bytes``);
- batch sizes back off on out-of-memory errors (``with_oom_backoff``), and the batch that fit is
  recorded.
On the CPU every one of these is off, and the code paths are the ones CI tests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from lepton_automl.exceptions import ConfigError
from lepton_automl.log import get_logger

logger = get_logger(__name__)

T = TypeVar("T")

DEVICE_HELP = "auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Accelerator:
    """How tensors run. ``device`` is a torch device string ("cpu", "cuda:0")."""

    device: str = "cpu"
    amp_dtype: str | None = None  # "bfloat16" or "float16" autocast on CUDA; None: full precision
    channels_last: bool = False
    workers: int = 0  # DataLoader processes that decode examples; 0: decode in this process
    pin_memory: bool = False
    cache_bytes: int = 0  # decoded training data is kept in memory up to this size (multi-epoch work)
    # Workers hand over ``Modality.encode_compact``'s form (uint8 pixels: a quarter of the bytes through
    # shared memory, pinned memory and the bus), expanded on the device (``model_inputs``).
    compact_transfer: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.amp_dtype is None else getattr(torch, self.amp_dtype)

    def name(self) -> str:
        """The GPU's name, or "cpu"."""
        return torch.cuda.get_device_name(torch.device(self.device)) if self.cuda else "cpu"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cuda and self.dtype is not None:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def kernels(self, *, autotune: bool, tf32: bool = True) -> contextlib.AbstractContextManager[Any]:
        """cuDNN settings for this block only (nothing global changes): TF32 convolutions unless ``tf32``
        is False (outputs that must match an fp32 export), and with ``autotune`` cuDNN times the
        algorithms of every convolution for each new input shape and keeps the fastest: worth it for
        long runs of one shape, not for a few batches (tuning a whole network takes seconds)."""
        if self.cuda:
            return torch.backends.cudnn.flags(enabled=True, benchmark=autotune, deterministic=False, allow_tf32=tf32)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is on only for fp16 (bf16 has fp32's range and needs none)."""
        return torch.amp.GradScaler("cuda" if self.cuda else "cpu", enabled=self.cuda and self.amp_dtype == "float16")

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on this device (in place), channels-last when it has 2-D convolutions."""
        model.to(self.device)
        if self.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Input tensors on this device; 4-D float tensors (images) channels-last when that is on."""
        out = []
        for t in tensors:
            t = t.to(self.device, non_blocking=self.pin_memory)
            if self.channels_last and t.ndim == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
            out.append(t)
        return out

    def model_inputs(self, modality: Any, tensors: Sequence[torch.Tensor],
                     preprocessing: Mapping[str, Any]) -> list[torch.Tensor]:
        """Batches from ``encoded_batches`` or a ``DecodedSet`` as the model's inputs on this device:
        moved, expanded from their compact form there (``Modality.expand``), channels-last."""
        moved = [t.to(self.device, non_blocking=self.pin_memory) for t in tensors]
        if self.compact_transfer:
            names = modality.input_names()
            expanded = modality.expand(dict(zip(names, moved)), preprocessing=preprocessing)
            moved = [expanded[n] for n in names]
        return self.inputs(moved)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(torch.device(self.device))


CPU = Accelerator()


def resolve_device(spec: str = "auto", *, workers: int | None = None) -> Accelerator:
    """The ``Accelerator`` for a ``--device`` value; raises ``ConfigError`` naming the fix when the
    device does not exist here. ``workers``: decoding processes on a GPU (default: the CPU count
    less two, at most 16: decoding images is what limits feature extraction on a fast GPU)."""
    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return CPU
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise ConfigError(f"Unknown device {spec!r}. Use {DEVICE_HELP}.")
    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = (f"this PyTorch ({torch.__version__}) is a CPU-only build" if build is None
               else f"this PyTorch (built for CUDA {build}) finds no GPU or no driver")
        raise ConfigError(f"--device {spec} asks for a CUDA GPU, and {why}. Use --device cpu (or auto).")
    index = int(text[5:]) if ":" in text else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {spec}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}. "
                          f"Use one of: {', '.join(f'cuda:{i}' for i in range(count))}.")
    bf16 = torch.cuda.is_bf16_supported()
    cpus = os.cpu_count() or 1
    total_ram = _total_memory_bytes()
    return Accelerator(device=f"cuda:{index}", amp_dtype="bfloat16" if bf16 else "float16", channels_last=True,
                       workers=min(16, max(1, cpus - 2)) if workers is None else int(workers), pin_memory=True,
                       cache_bytes=total_ram // 4, compact_transfer=True)


def _total_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 4 * 2**30


def with_oom_backoff(run: Callable[[int], T], batch_size: int, *, minimum: int = 1,
                     what: str = "the batch") -> tuple[T, int]:
    """``run(batch_size)``, halving ``batch_size`` after each out-of-memory error down to ``minimum``;
    returns the result and the batch size that fit. An error at ``minimum`` is raised as it came."""
    batch = max(int(batch_size), int(minimum))
    while True:
        try:
            return run(batch), batch
        except torch.OutOfMemoryError:
            if batch <= minimum:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = max(minimum, batch // 2)
            logger.warning("%s of %d did not fit in GPU memory; trying %d", what, batch, smaller)
            batch = smaller


# -- examples to tensors ---------------------------------------------------------------------------

class _EncodedChunks(torch.utils.data.Dataset):
    """Item k: the encoded inputs of the k-th ``batch_size`` slice of ``order`` (decoding happens in
    whichever process asks: a DataLoader worker on a GPU machine)."""

    def __init__(self, modality: Any, examples: Sequence[Any], preprocessing: Mapping[str, Any],
                 order: np.ndarray, batch_size: int, compact: bool) -> None:
        self.modality, self.examples, self.preprocessing = modality, examples, preprocessing
        self.order, self.batch_size = order, int(batch_size)
        self.names = modality.input_names()
        self.encode = modality.encode_compact if compact else modality.encode

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, k: int) -> tuple[np.ndarray, list[torch.Tensor]]:
        idx = self.order[k * self.batch_size : (k + 1) * self.batch_size]
        feeds = self.encode([self.examples[int(i)] for i in idx], preprocessing=self.preprocessing)
        return idx, [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.names]


def encoded_batches(modality: Any, examples: Sequence[Any], preprocessing: Mapping[str, Any], *,
                    batch_size: int, accel: Accelerator = CPU,
                    order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
    """(example indices, input tensors on the CPU) per batch of ``order`` (default: all, in order).
    With ``accel.workers`` the batches are decoded in that many worker processes, ahead of use; with
    ``accel.compact_transfer`` in their compact form (pass them through ``accel.model_inputs``)."""
    order = np.arange(len(examples)) if order is None else np.asarray(order)
    chunks = _EncodedChunks(modality, examples, preprocessing, order, batch_size, accel.compact_transfer)
    if accel.workers <= 0 or len(chunks) <= 1:
        yield from (chunks[k] for k in range(len(chunks)))
        return
    # Workers are forked: a Rust tokenizer used before the fork would otherwise warn and turn its own
    # parallelism off in every worker; each worker encodes one batch at a time anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, shuffle=False,
                                         num_workers=min(accel.workers, len(chunks)),
                                         pin_memory=accel.pin_memory, prefetch_factor=4)
    yield from loader


@dataclass(frozen=True)
class DecodedSet:
    """Every example of a dataset encoded once, as whole tensors (rows = examples), for training that
    passes over the same data many times. Sequence inputs are padded to the longest example; a batch
    drawn from it is trimmed back to its own longest (``batch``). Rows are in the form the workers
    handed over: pass a batch through ``Accelerator.model_inputs``."""

    tensors: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def batch(self, idx: np.ndarray) -> list[torch.Tensor]:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.tensors[0].device)
        rows = [t.index_select(0, index) for t in self.tensors]
        return _trim_padding(rows)


def decode_all(modality: Any, examples: Sequence[Any], preprocessing: Mapping[str, Any], *,
               accel: Accelerator, batch_size: int = 64) -> DecodedSet | None:
    """``examples`` decoded once (``DecodedSet``), or None when the estimate from one batch exceeds
    ``accel.cache_bytes`` (then training decodes each batch as it goes). On a GPU the set is kept in
    GPU memory when it takes less than a quarter of what is free there: batches are then cut on the
    GPU, and no copy from host memory waits in each training step."""
    if accel.cache_bytes <= 0 or not len(examples):
        return None
    encode = modality.encode_compact if accel.compact_transfer else modality.encode
    first = encode(list(examples[: min(8, len(examples))]), preprocessing=preprocessing)  # for the estimate
    per_example = sum(v.nbytes for v in first.values()) / max(1, len(next(iter(first.values()))))
    if per_example * len(examples) > accel.cache_bytes:
        logger.info("decoded training data (~%.0f MB) is above the in-memory limit; decoding per batch",
                    per_example * len(examples) / 2**20)
        return None
    chunks = [tensors for _, tensors in encoded_batches(modality, examples, preprocessing,
                                                        batch_size=batch_size, accel=accel)]
    decoded = DecodedSet(concat_batches(chunks))
    if accel.cuda and decoded.nbytes < torch.cuda.mem_get_info(torch.device(accel.device))[0] / 4:
        decoded = DecodedSet(tuple(t.to(accel.device) for t in decoded.tensors))
    return decoded


def in_batch_order(modality: Any, examples: Sequence[Any],
                   run: Callable[[Sequence[Any]], Sequence[np.ndarray]]) -> tuple[np.ndarray, ...]:
    """``run`` (batched inference, outputs with a leading example axis) on ``examples`` in the
    modality's ``batch_order``, its outputs put back in the order given. Man-page summaries (median 9
    tokens, some 256) through MiniLM at 256 tokens: 10.0 s in the given order, 2.9 s sorted by
    length, the same features (5e-8 apart)."""
    order = modality.batch_order(examples)
    if order is None:
        return tuple(run(examples))
    order = np.asarray(order)
    restored = []
    for out in run([examples[i] for i in order]):
        back = np.empty_like(out)
        back[order] = out
        restored.append(back)
    return tuple(restored)


def concat_batches(chunks: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """Per-batch tuples of outputs (numpy arrays or torch tensors) joined output by output
    (``concat_padded``)."""
    return tuple(concat_padded([c[i] for c in chunks]) for i in range(len(chunks[0])))


def concat_padded(parts: Sequence[Any]) -> Any:
    """Concatenate numpy arrays or torch tensors along the batch axis, zero-padding axis 1 to the
    longest (token sequences of batches padded to different lengths; a zero attention mask marks the
    padding, so the model ignores it)."""
    if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
        width = max(p.shape[1] for p in parts)
        if isinstance(parts[0], np.ndarray):
            parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts]
        else:
            parts = [nn.functional.pad(p, (0, 0) * (p.ndim - 2) + (0, width - p.shape[1])) for p in parts]
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(list(parts))


def _trim_padding(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drop trailing sequence positions that are zero in every integer 2-D input (token ids and
    attention masks padded with 0), so a batch of short texts is not computed at the longest length."""
    ints = [r for r in rows if r.ndim == 2 and not r.is_floating_point()]
    if not ints or any(r.shape[1] != ints[0].shape[1] for r in ints):
        return rows
    used = torch.stack([(r != 0).any(0) for r in ints]).any(0)
    nonzero = torch.nonzero(used)
    length = int(nonzero.max()) + 1 if len(nonzero) else 1
    if length == ints[0].shape[1]:
        return rows
    return [r[:, :length] if (r.ndim == 2 and not r.is_floating_point()) else r for r in rows]
