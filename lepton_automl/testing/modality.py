"""``ModalityTestCase``: the contract of ``lepton_automl.interfaces.Modality``, as tests.

Every registered modality, built-in or third-party, runs this suite in Lepton's own tests. It checks
what the core relies on: ingest yields valid ``LabelledData`` without touching the source; the
search space uses ``data__`` names; preprocessing is JSON; ``encode`` matches ``input_names`` and
keeps the batch; the trunk/tail cut composes into features of ``feature_dim``; the composed model
exports to ONNX and ONNX Runtime agrees with torch; nothing mutates the data it is given.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.data.dataset import LabelledData
from lepton_automl.interfaces import Modality


@dataclass
class ModalityCase:
    """What the suite needs: the modality, a small dataset it can load, and a backbone to cut."""

    modality: Modality
    source: Any
    backbone: str
    registry: BackboneRegistry = field(default_factory=BackboneRegistry)
    load_options: dict[str, Any] = field(default_factory=dict)
    predict_inputs: list[str] | None = None  # what a user would pass to `lepton predict`


class ModalityTestCase:
    """Subclass it (name it ``Test...``) and provide the ``case`` fixture."""

    @pytest.fixture
    def case(self) -> ModalityCase:  # pragma: no cover - provided by subclasses
        raise NotImplementedError("Provide a `case` fixture returning a ModalityCase.")

    @pytest.fixture
    def data(self, case: ModalityCase) -> LabelledData:
        return case.modality.load(case.source, options=case.load_options)

    # -- identity --------------------------------------------------------------------------
    def test_has_name_and_tasks(self, case: ModalityCase) -> None:
        assert isinstance(type(case.modality).name, str) and type(case.modality).name
        assert "classification" in case.modality.tasks
        assert case.modality.input_names() and all(isinstance(n, str) for n in case.modality.input_names())

    # -- ingest ----------------------------------------------------------------------------
    def test_recognises_and_loads_its_data(self, case: ModalityCase, data: LabelledData) -> None:
        assert case.modality.can_load(case.source)
        assert isinstance(data, LabelledData) and len(data) > 0
        assert data.num_classes >= 2
        assert data.labels.min() >= 0 and data.labels.max() < data.num_classes
        assert data.fingerprint() == case.modality.load(case.source, options=case.load_options).fingerprint()

    def test_load_does_not_modify_the_source(self, case: ModalityCase) -> None:
        before = _snapshot(case.source)
        case.modality.load(case.source, options=case.load_options)
        assert _snapshot(case.source) == before

    # -- search space ----------------------------------------------------------------------
    def test_suggest_uses_prefixed_names(self, case: ModalityCase) -> None:
        import optuna

        card = case.registry.get(case.backbone)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        params = case.modality.suggest(study.ask(), card)
        assert params and all(k.startswith("data__") for k in params)
        assert all(k.startswith("data__") for k in case.modality.default_params(card))
        for variant in case.modality.warm_start_variants(card):
            assert all(k.startswith("data__") for k in variant)

    def test_equivalent_parameters_give_the_same_inputs(self, case: ModalityCase, data: LabelledData) -> None:
        """Parameters the search treats as one configuration on this data (``equivalent_params``) must
        encode every example of it identically; the parameters it returns are the modality's own."""
        import optuna

        card = case.registry.get(case.backbone)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(8):
            params = case.modality.suggest(study.ask(), card)
            same = case.modality.equivalent_params(card, case.registry, params, examples=data.examples)
            assert set(same) == set(params)
            if same == params:
                continue
            before = case.modality.encode(data.examples, preprocessing=case.modality.preprocessing(
                card, case.registry, params=params))
            after = case.modality.encode(data.examples, preprocessing=case.modality.preprocessing(
                card, case.registry, params=same))
            assert set(before) == set(after)
            assert all(np.array_equal(before[k], after[k]) for k in before), (params, same)

    def test_preprocessing_is_json(self, case: ModalityCase) -> None:
        card = case.registry.get(case.backbone)
        prep = case.modality.preprocessing(card, case.registry, params=case.modality.default_params(card))
        assert json.loads(json.dumps(prep)) == prep

    # -- encode ----------------------------------------------------------------------------
    def test_encode_matches_input_names_and_batch(self, case: ModalityCase, data: LabelledData) -> None:
        card = case.registry.get(case.backbone)
        prep = case.modality.preprocessing(card, case.registry, params=case.modality.default_params(card))
        examples = data.examples[:3]
        frozen = copy.deepcopy(examples)
        encoded = case.modality.encode(examples, preprocessing=prep)
        assert set(encoded) == set(case.modality.input_names())
        for array in encoded.values():
            assert isinstance(array, np.ndarray) and array.shape[0] == len(examples)
            assert np.all(np.isfinite(array))
        assert examples == frozen, "encode must not modify the examples"

    def test_the_compact_form_expands_to_encode(self, case: ModalityCase, data: LabelledData) -> None:
        """What decoding workers hand to a GPU (``encode_compact``), expanded there, is ``encode``'s."""
        card = case.registry.get(case.backbone)
        prep = case.modality.preprocessing(card, case.registry, params=case.modality.default_params(card))
        examples = data.examples[:3]
        full = case.modality.encode(examples, preprocessing=prep)
        compact = case.modality.encode_compact(examples, preprocessing=prep)
        expanded = case.modality.expand({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in compact.items()},
                                        preprocessing=prep)
        assert set(expanded) == set(full)
        for name, array in full.items():
            got = expanded[name].numpy()
            assert got.dtype == array.dtype and got.shape == array.shape, name
            np.testing.assert_allclose(got, array, rtol=1e-5, atol=1e-5, err_msg=name)

    def test_inference_in_batch_order_gives_each_example_its_own_outputs(self, case: ModalityCase,
                                                                         data: LabelledData) -> None:
        """``batch_order`` is None or a permutation of the examples, and a trunk run over many examples
        (batched in that order, then put back) gives each example what it gets alone."""
        from lepton_automl.export.trunk import run_trunk

        examples = data.examples[: min(len(data), 12)]
        order = case.modality.batch_order(examples)
        if order is not None:
            assert sorted(np.asarray(order).tolist()) == list(range(len(examples)))
        card = case.registry.get(case.backbone)
        params = case.modality.default_params(card)
        parts = case.modality.build(card, case.registry, params=params, finetune_blocks=0)
        prep = case.modality.preprocessing(card, case.registry, params=params)
        (together,) = run_trunk(parts.trunk, case.modality, examples, preprocessing=prep, batch_size=5)[:1]
        for i, example in enumerate(examples):
            (alone,) = run_trunk(parts.trunk, case.modality, [example], preprocessing=prep)[:1]
            np.testing.assert_allclose(together[i], alone[0], rtol=1e-4, atol=1e-5, err_msg=f"example {i}")

    # -- model -----------------------------------------------------------------------------
    @pytest.mark.parametrize("blocks", [0, 1])
    def test_trunk_and_tail_compose_into_features(self, case: ModalityCase, data: LabelledData, blocks: int) -> None:
        card = case.registry.get(case.backbone)
        if blocks > case.modality.max_finetune_blocks(card):
            pytest.skip("the backbone cannot be cut")
        params = case.modality.default_params(card)
        parts = case.modality.build(card, case.registry, params=params, finetune_blocks=blocks)
        prep = case.modality.preprocessing(card, case.registry, params=params)
        encoded = case.modality.encode(data.examples[:2], preprocessing=prep)
        with torch.no_grad():
            outs = parts.trunk(*[torch.from_numpy(encoded[n]) for n in case.modality.input_names()])
            assert isinstance(outs, tuple)
            feats = parts.tail(*outs)
        assert feats.shape == (2, parts.feature_dim)

    def test_structured_pruning_by_layers_is_re_applied_by_build(self, case: ModalityCase, data: LabelledData) -> None:
        """A "layers" modality's ``build`` keeps the first layers the parameters say (through its
        ``drop_layers`` hook) and still cuts into a working trunk; a "channels" modality's backbone is
        left as loaded by ``apply_structure``."""
        card = case.registry.get(case.backbone)
        params = case.modality.default_params(card)
        dropped_params = {**params, "prune__method": "structured", "prune__target": "layers", "prune__amount": 0.5}
        if case.modality.structured_pruning != "layers":
            backbone = torch.nn.Linear(2, 2)
            assert case.modality.apply_structure(backbone, dropped_params) is backbone
            return
        full = case.modality.build(card, case.registry, params=params)
        dropped = case.modality.build(card, case.registry, params=dropped_params)
        size = lambda parts: sum(p.numel() for p in parts.trunk.parameters())  # noqa: E731
        assert size(dropped) < size(full)
        prep = case.modality.preprocessing(card, case.registry, params=params)
        encoded = case.modality.encode(data.examples[:2], preprocessing=prep)
        with torch.no_grad():
            feats = dropped.tail(*dropped.trunk(*[torch.from_numpy(encoded[n]) for n in case.modality.input_names()]))
        assert feats.shape == (2, dropped.feature_dim)

    def test_exports_to_onnx_and_agrees_with_torch(self, case: ModalityCase, data: LabelledData, tmp_path) -> None:
        from lepton_automl.sessions import ort_session

        from lepton_automl.export.onnx import export_onnx
        from lepton_automl.interfaces import ExportModel

        card = case.registry.get(case.backbone)
        params = case.modality.default_params(card)
        parts = case.modality.build(card, case.registry, params=params)
        model = ExportModel(parts.trunk, parts.tail, torch.nn.Linear(parts.feature_dim, data.num_classes)).eval()
        prep = case.modality.preprocessing(card, case.registry, params=params)
        encoded = case.modality.encode(data.examples[:2], preprocessing=prep)
        path = export_onnx(model, {k: v[:1] for k, v in encoded.items()}, tmp_path / "m.onnx",
                           input_names=case.modality.input_names(), dynamic_axes=case.modality.dynamic_axes())
        session = ort_session(path)
        got = session.run(["logits"], encoded)[0]
        with torch.no_grad():
            want = model(*[torch.from_numpy(encoded[n]) for n in case.modality.input_names()]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)

    def test_read_inputs_keeps_one_example_per_item(self, case: ModalityCase) -> None:
        if case.predict_inputs is None:
            pytest.skip("no predict inputs given")
        assert len(case.modality.read_inputs(case.predict_inputs)) == len(case.predict_inputs)


def _snapshot(source: Any) -> Any:
    """A comparable picture of a data source: file names, sizes and mtimes, or the object's content."""
    from pathlib import Path

    if isinstance(source, (str, Path)) and Path(source).exists():
        root = Path(source)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if hasattr(source, "to_dict"):
        return source.to_dict()
    return copy.deepcopy(source)
