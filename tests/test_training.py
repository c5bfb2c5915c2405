"""The probe that picks its own regularisation, and the one fine-tuning loop (seeded, best epoch kept)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lepton_automl.data.split import split_data
from lepton_automl.interfaces import ExportModel, TupleOut
from lepton_automl.training.finetune import FineTuneConfig, evaluate_accuracy, fine_tune
from lepton_automl.training.trainer import PROBE_L2_GRID, TrainConfig, select_probe, train_probe
from lepton_image import ImageModality


def _blobs(n: int, *, dims: int, informative: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    centres = np.random.default_rng(99).normal(0, 1.5, size=(3, informative))
    x = rng.normal(0, 1.0, size=(n, dims)).astype(np.float32)
    x[:, :informative] += centres[labels]
    scale = np.random.default_rng(98).uniform(0.1, 50, size=dims).astype(np.float32)  # badly scaled on purpose
    return x * scale, labels


def test_the_probe_picks_its_strength_by_cross_validation_and_generalises() -> None:
    x, y = _blobs(150, dims=400, informative=8, seed=0)
    fit = select_probe(x, y, 3, seed=0)
    tried = list(fit.cv_by_l2)
    assert tried == list(PROBE_L2_GRID[:len(tried)])  # strongest first, along the path
    best = max(fit.cv_by_l2.values())
    if len(tried) < len(PROBE_L2_GRID):  # the path stopped: two strengths in a row short of the best
        assert all(fit.cv_by_l2[l2] < best for l2 in tried[-2:])
    assert fit.cv_accuracy == best
    assert fit.l2 == max(l2 for l2, acc in fit.cv_by_l2.items() if acc == best)  # ties: the stronger
    x_test, y_test = _blobs(3000, dims=400, informative=8, seed=1)
    with torch.no_grad():
        test_acc = float((fit.head(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    # 150 examples in 400 badly scaled dimensions (chance 0.33): the head learns, and cross-validation
    # estimates its accuracy on 3,000 new examples (measured 0.70 vs 0.72)
    assert test_acc >= 0.6
    assert abs(test_acc - fit.cv_accuracy) < 0.08


@pytest.mark.parametrize("dims", [40, 400])
def test_the_head_on_every_example_is_the_fit_at_the_chosen_strength(dims) -> None:
    # it starts from the mean of the folds' heads and runs at the chosen strength: it must reach the
    # optimum a long fit from zero reaches at that strength
    x, y = _blobs(300, dims=dims, informative=8, seed=0)
    fit = select_probe(x, y, 3, seed=0)
    reference = train_probe(x, y, 3, TrainConfig(weight_decay=fit.l2, probe_iters=500))
    z = fit.head[0](torch.from_numpy(x)).detach()

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> float:
        return float(nn.functional.cross_entropy(z @ weight.T + bias, torch.from_numpy(y))
                     + 0.5 * fit.l2 * weight.pow(2).sum())

    with torch.no_grad():
        reached = objective(fit.head[1].weight, fit.head[1].bias)
        optimum = objective(reference[1].weight, reference[1].bias)
    assert reached == pytest.approx(optimum, rel=1e-3)


@pytest.mark.parametrize("dims", [40, 400])  # 400 features for 150 examples: fit on the examples' span
def test_out_of_fold_scoring_reproduces_the_cross_validated_accuracy_and_sees_perturbed_features(dims) -> None:
    x, y = _blobs(150, dims=dims, informative=8, seed=0)
    fit = select_probe(x, y, 3, seed=0)
    rows = np.arange(len(y))
    # every example scored by the fold head that did not see it: exactly the selection's own estimate
    assert fit.out_of_fold_accuracy(x, y, rows) == pytest.approx(fit.cv_accuracy, abs=1e-9)
    # a subset (the validation rows of train + validation) is scored by the same heads
    tail = rows[100:]
    with torch.no_grad():
        in_sample = float((fit.head(torch.from_numpy(x[tail])).argmax(1).numpy() == y[tail]).mean())
    assert fit.out_of_fold_accuracy(x[tail], y[tail], tail) <= in_sample  # the head saw them; the folds did not
    noisy = x + np.random.default_rng(5).normal(0, 3.0, size=x.shape).astype(np.float32) * x.std(0)
    assert fit.out_of_fold_accuracy(noisy, y, rows) < fit.cv_accuracy - 0.1  # what perturbed features cost


def _model(num_classes: int) -> ExportModel:
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ExportModel(TupleOut(trunk), nn.Identity(), nn.Linear(8, num_classes))


def test_fine_tuning_is_seeded_leaves_the_global_rng_alone_and_keeps_the_best_epoch(image_folder) -> None:
    modality = ImageModality()
    splits = split_data(modality.load(image_folder), seed=0)
    prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    torch.manual_seed(1234)
    first = _model(3)
    second = _model(3)
    second.load_state_dict(first.state_dict())
    cfg = FineTuneConfig(epochs=4, lr=3e-3, batch_size=8, seed=7)
    before = torch.get_rng_state().clone()
    log = fine_tune(first, modality, splits.train, prep, cfg, validation=splits.validation)
    assert torch.equal(torch.get_rng_state(), before), "fine_tune must not draw from the global torch RNG"
    fine_tune(second, modality, splits.train, prep, cfg, validation=splits.validation)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b), "the same seed must give the same weights"
    assert len(log.curve) == 4 and log.best_epoch == int(np.argmax(log.curve)) + 1
    assert [float(right.mean()) for right in log.validation_correct] == pytest.approx(log.curve)
    assert evaluate_accuracy(first, modality, splits.validation, prep) == pytest.approx(max(log.curve))
    assert not any(p.requires_grad for p in first.parameters()) and not first.training


def test_fine_tuning_ends_where_the_caller_says_keeping_the_best_epoch_so_far(image_folder) -> None:
    """``after_epoch`` returning True ends training after that epoch (a trial's time ran short), and
    the best epoch so far is what the model holds; the search's check says whether one more fits."""
    import time

    from lepton_automl.search.budget import AFTER_TRAINING_S, another_epoch_fits
    from lepton_automl.search.limits import Deadline

    modality = ImageModality()
    splits = split_data(modality.load(image_folder), seed=0)
    prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    torch.manual_seed(0)
    model = _model(3)
    seen: list[int] = []
    log = fine_tune(model, modality, splits.train, prep, FineTuneConfig(epochs=4, lr=3e-3, batch_size=8, seed=7),
                    validation=splits.validation, after_epoch=lambda epoch, _: seen.append(epoch) or epoch == 2)
    assert seen == [1, 2] and len(log.curve) == 2 and len(log.seconds_per_epoch) == 2
    assert evaluate_accuracy(model, modality, splits.validation, prep) == pytest.approx(max(log.curve))

    deadline = Deadline(time.perf_counter(), limit=AFTER_TRAINING_S + 100.0)
    assert another_epoch_fits(50.0, deadline) and not another_epoch_fits(150.0, deadline)
    assert not another_epoch_fits(50.0, deadline, reserve=60.0)  # time kept for what follows (pruning)
    assert another_epoch_fits(1e9, Deadline(time.perf_counter(), limit=None))


def test_timing_a_training_step_changes_nothing(image_folder) -> None:
    from lepton_automl.training.finetune import time_training_step

    modality = ImageModality()
    splits = split_data(modality.load(image_folder), seed=0)
    prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    torch.manual_seed(0)
    model = _model(3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert time_training_step(model, modality, splits.train, prep, batch_size=8) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights and batch-norm statistics unchanged"
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_a_training_step_is_timed_on_a_batch_of_typical_length(tiny_bert_dir) -> None:
    """A text batch is padded to its longest text and an epoch's batches are grouped by length: the
    batch a step is timed on, scaled, must stand for the epoch's mean batch, not for the set's first
    rows (here padded to the longest text of all)."""
    from lepton_automl.training.finetune import length_grouped, length_rank, typical_batch
    from lepton_text import TextModality
    from tests.conftest import WORDS

    modality = TextModality()
    prep = {"max_length": 64, "tokenizer": str(tiny_bert_dir)}
    rng = np.random.default_rng(0)
    vocabulary = [w for words in WORDS.values() for w in words]
    texts = [" ".join(rng.choice(vocabulary, size=int(n))) for n in [60, *rng.geometric(0.15, size=799)]]
    batch = 32

    def size(rows) -> int:  # what a batch costs: its encoded values, padding included
        return sum(v.size for v in modality.encode([texts[i] for i in rows], preprocessing=prep).values())

    rows, scale = typical_batch(modality, texts, prep, batch_size=batch, seed=3)
    assert len(rows) == batch == len(set(rows.tolist())) and 0.8 < scale < 1.25
    predicted = scale * size(rows) * (len(texts) // batch)  # 800 rows: 25 full batches
    rank = length_rank(modality, texts)
    for seed in range(3):  # epochs drawn as fine_tune draws them
        order = length_grouped(np.random.default_rng(100 + seed).permutation(len(texts)), rank, batch)
        epoch = sum(size(order[s : s + batch]) for s in range(0, len(texts), batch))
        assert predicted == pytest.approx(epoch, rel=0.1)
        assert size(range(batch)) * (len(texts) // batch) > 2 * epoch  # the first rows: the longest text's padding
    # images all cost alike: the first rows, as they are
    first, one = typical_batch(ImageModality(), [f"{i}.png" for i in range(100)], {}, batch_size=batch)
    assert first.tolist() == list(range(batch)) and one == 1.0


def test_text_training_batches_are_drawn_at_random_and_alike_in_length() -> None:
    from lepton_automl.training.finetune import LENGTH_GROUP_BATCHES, length_grouped, length_rank
    from lepton_text import TextModality

    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.integers(1, 200, size=1000)]
    rank = length_rank(TextModality(), texts)
    assert length_rank(ImageModality(), texts) is None  # images keep the shuffled order
    lengths = np.array([len(t) for t in texts])
    batch, group = 8, LENGTH_GROUP_BATCHES * 8
    epochs = [length_grouped(rng.permutation(len(texts)), rank, batch) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(len(texts)))  # every example once
        for start in range(0, len(order), group):  # each group is sorted by length
            assert np.all(np.diff(lengths[order[start : start + group]]) >= 0)

    def padded(order: np.ndarray) -> int:  # what the batches cost, padded to their longest
        return sum(len(order[s : s + batch]) * lengths[order[s : s + batch]].max() for s in range(0, len(order), batch))

    shuffled = rng.permutation(len(texts))
    assert length_grouped(shuffled, None, batch) is shuffled
    assert padded(epochs[0]) < 0.7 * padded(shuffled)
    # and the batches themselves differ from epoch to epoch
    first = {frozenset(epochs[0][s : s + batch].tolist()) for s in range(0, len(texts), batch)}
    second = {frozenset(epochs[1][s : s + batch].tolist()) for s in range(0, len(texts), batch)}
    assert len(first & second) < len(first) // 4


def test_partial_fine_tuning_reports_every_step_and_is_paced_inside_the_trial_time() -> None:
    """``train_tail`` calls ``after_batch`` after every step. The search's pacer stops a trial whose
    first epoch cannot finish, after its first steps rather than at the limit, and ends training after
    an epoch when another would not finish at the pace measured."""
    import time

    from lepton_automl.search.budget import AFTER_TRAINING_S, EpochPacer
    from lepton_automl.search.early_stopping import TrialStopped
    from lepton_automl.search.limits import Deadline
    from lepton_automl.training.trainer import train_tail

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2)

    def parts() -> tuple[nn.Module, nn.Sequential]:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Sequential(nn.Identity(), nn.Linear(16, 2))

    def run(pacer: EpochPacer) -> list[int]:
        seen: list[int] = []
        tail, head = parts()
        train_tail(tail, head, (x,), y, cfg, after_batch=lambda epoch: seen.append(epoch) or pacer.after_batch(epoch),
                   should_stop=lambda epoch, _: pacer.ends_after(epoch))
        return seen

    unlimited = EpochPacer(Deadline(time.perf_counter(), None), what="fine-tuning", steps_per_epoch=8)
    assert run(unlimited) == [1] * 8 + [2] * 8 + [3] * 8
    # Nothing left beyond what export and measurement keep: stopped after the first three steps.
    late = EpochPacer(Deadline(time.perf_counter(), AFTER_TRAINING_S), what="fine-tuning", steps_per_epoch=8)
    with pytest.raises(TrialStopped, match="rest of the first, from its first 3 steps"):
        run(late)
    assert late.steps == 3
    # Training that began 100 s ago with 50 s left: the first epoch runs (its check is on the steps'
    # own pace), then another 100-s epoch would not finish, so training ends after epoch 1.
    now = time.perf_counter()
    slow = EpochPacer(Deadline(now, AFTER_TRAINING_S + 50.0), what="fine-tuning", steps_per_epoch=8, start=now - 100.0)
    assert slow.ends_after(1) and not EpochPacer(Deadline(now, None), what="x", steps_per_epoch=8).ends_after(1)
    # 130 s left: another 100-s epoch fits, unless the head refit that follows a partial fine-tuning
    # keeps its time (a third of an epoch and a probe fit: 38 s here).
    from lepton_automl.search.training_steps import REFIT_EPOCHS, REFIT_S

    roomy = EpochPacer(Deadline(now, AFTER_TRAINING_S + 130.0), what="fine-tuning", steps_per_epoch=8, start=now - 100.0)
    kept = EpochPacer(Deadline(now, AFTER_TRAINING_S + 130.0), what="fine-tuning", steps_per_epoch=8, start=now - 100.0,
                      reserve_epochs=REFIT_EPOCHS, reserve_s=REFIT_S)
    assert not roomy.ends_after(1) and kept.ends_after(1)


def test_weighted_rows_pull_the_head_and_judged_rows_alone_choose_the_strength() -> None:
    x, y = _blobs(300, dims=40, informative=8, seed=0)
    # The same examples twice, the second copy with its labels shifted by one class: the head must
    # side with the copy that weighs more.
    twice = np.concatenate([x, x])
    labels = np.concatenate([y, (y + 1) % 3])
    second = np.arange(len(labels)) >= len(y)
    x_test, y_test = _blobs(2000, dims=40, informative=8, seed=1)

    def agrees_with_first(fit) -> float:
        with torch.no_grad():
            return float((fit.head(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

    first_heavier = select_probe(twice, labels, 3, seed=0, row_weights=np.where(second, 1.0, 2.0))
    second_heavier = select_probe(twice, labels, 3, seed=0, row_weights=np.where(second, 2.0, 1.0))
    assert agrees_with_first(first_heavier) > 0.6 > 0.2 > agrees_with_first(second_heavier)
    # Judged on the first copy alone: its out-of-fold accuracy, scored by the fold heads, is cv_accuracy.
    judged = select_probe(twice, labels, 3, seed=0, row_weights=np.where(second, 1.0, 2.0), judged_rows=~second)
    rows = np.flatnonzero(~second)
    assert judged.cv_accuracy == pytest.approx(judged.out_of_fold_accuracy(x, y, rows), abs=1e-9)
    assert judged.cv_accuracy > 0.6  # the whole pool's accuracy could not be: every example is there twice, once wrong
    assert max(first_heavier.cv_by_l2.values()) < 0.6
    with pytest.raises(ValueError, match="judged_rows must mark at least one of the 600 examples"):
        select_probe(twice, labels, 3, seed=0, judged_rows=np.zeros(len(labels), dtype=bool))


def test_a_validation_pass_batches_texts_of_alike_length_and_scores_each_as_alone(tiny_bert_dir) -> None:
    """``evaluate_correct`` runs its batches in the modality's ``batch_order`` (a text batch is padded to
    its longest text): far fewer padded tokens than batches as the texts came, and each example gets
    what the model says of it alone, from encoded batches and from a decoded set alike."""
    from lepton_automl.accel import CPU, decode_all
    from lepton_automl.backbones import BackboneCard, BackboneRegistry
    from lepton_automl.data.dataset import LabelledData
    from lepton_automl.interfaces import build_seeded
    from lepton_automl.training.finetune import evaluate_correct
    from lepton_text import TextModality
    from tests.conftest import WORDS

    modality = TextModality()
    registry = BackboneRegistry()
    card = BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local")
    registry.register(card)
    prep = {"max_length": 48, "tokenizer": str(tiny_bert_dir)}
    parts = build_seeded(modality, card, registry, params={}, finetune_blocks=0, pretrained=True, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ExportModel(parts.trunk, parts.tail, nn.Linear(parts.feature_dim, len(WORDS))).eval()
    rng = np.random.default_rng(0)
    words = [w for ws in WORDS.values() for w in ws]
    texts = [" ".join(rng.choice(words, size=40 if i % 10 == 0 else int(rng.integers(2, 6)))) for i in range(200)]
    labels = rng.integers(0, len(WORDS), size=len(texts))
    data = LabelledData(examples=tuple(texts), labels=labels, classes=tuple(sorted(WORDS)), name="texts")
    with torch.no_grad():
        alone = np.array([int(model(*[torch.from_numpy(modality.encode([t], preprocessing=prep)[name])
                                      for name in modality.input_names()]).argmax(1)) for t in texts]) == labels
    padded = []
    hook = model.register_forward_pre_hook(lambda _, args: padded.append(int(args[0].numel())))
    assert np.array_equal(evaluate_correct(model, modality, data, prep, batch_size=32), alone)
    tokens = sum(padded)
    assert np.array_equal(evaluate_correct(model, modality, data, prep, batch_size=32,
                                           decoded=decode_all(modality, texts, prep, accel=CPU)), alone)
    hook.remove()
    as_they_came = sum(int(modality.encode(texts[s : s + 32], preprocessing=prep)["input_ids"].size)
                       for s in range(0, len(texts), 32))
    assert tokens < 0.5 * as_they_came
    assert sum(padded) - tokens < 0.5 * as_they_came  # the decoded set's batches too
