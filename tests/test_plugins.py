"""Entry-point discovery of plugins: lazy, duplicates refused, broken ones isolated, autoload switch."""

from __future__ import annotations

import importlib.metadata

import pytest

from lepton_automl.exceptions import PluginError
from lepton_automl.plugins import MODALITIES, PluginRegistry


def test_builtin_modalities_register_by_entry_point() -> None:
    registry = PluginRegistry(MODALITIES)
    assert {"image", "text"} <= set(registry)
    assert registry["image"].distribution == "lepton-automl"
    cls = registry.load("image")
    assert cls.name == "image"


class _FakeDist:
    def __init__(self, name: str) -> None:
        self.metadata = {"Name": name}
        self.version = "9.9"


def _fake_entry_points(entries):
    def entry_points(group=None, **kwargs):
        eps = []
        for name, value, dist in entries:
            ep = importlib.metadata.EntryPoint(name=name, value=value, group=MODALITIES)
            object.__setattr__(ep, "dist", _FakeDist(dist)) if hasattr(ep, "dist") else None
            eps.append(ep)
        return [e for e in eps if group in (None, MODALITIES)]

    return entry_points


def test_duplicate_plugin_names_are_refused_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points([
        ("image", "lepton_image:ImageModality", "lepton-automl"),
        ("image", "someone_else:Images", "other-dist"),
    ]))
    with pytest.raises(PluginError) as info:
        list(PluginRegistry(MODALITIES))
    assert "registered twice" in str(info.value)
    assert "someone_else:Images" in str(info.value) and "lepton_image:ImageModality" in str(info.value)


def test_broken_plugin_is_reported_and_others_still_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points([
        ("image", "lepton_image:ImageModality", "lepton-automl"),
        ("broken", "lepton_no_such_module:Thing", "broken-dist"),
    ]))
    registry = PluginRegistry(MODALITIES)
    loaded = registry.load_all()
    assert "image" in loaded and "broken" not in loaded
    assert "failed to import" in registry.errors["broken"]
    with pytest.raises(PluginError, match="ModuleNotFoundError"):
        registry.load("broken")


def test_autoload_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEPTON_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = PluginRegistry(MODALITIES)
    assert list(registry) == []
    registry.register("image", "lepton_image:ImageModality")
    assert registry.load("image").name == "image"


def test_unknown_plugin_names_the_listing_command() -> None:
    with pytest.raises(PluginError, match="lepton plugins list"):
        PluginRegistry(MODALITIES).load("imaeg")
