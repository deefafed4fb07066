"""The registry file: checked on load, errors name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimesh_servers.registry.schema import Capability, RegistryError, load_registry

GOOD = """
kind: aimesh/registry/v1
models:
  - id: chat
    capability: text_generation
    versions: [{version: "1", source: a}, {version: "2", source: b, deprecated: true}]
    default_version: "1"
    pools: [{id: primary, serve: text}, {id: cloud, serve: openai, replicas: 0, source: gpt-4o-mini}]
    prices: {input_tokens: 0.1}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


def test_the_built_in_registry_covers_every_capability():
    registry = load_registry()
    assert {m.capability for m in registry.models} == set(Capability)
    for model in registry.models:
        assert model.pools and model.default.source


def test_a_good_registry_loads_with_defaults_and_chain_order(tmp_path):
    registry = load_registry(write(tmp_path, GOOD))
    chat = registry.get("chat")
    assert chat is not None and chat.default.version == "1" and chat.cluster == "model_chat"
    assert [p.id for p in chat.pools] == ["primary", "cloud"] and chat.pools[0].replicas == 1
    assert chat.services == ("aimesh.text.v1.TextGenerationService",)


@pytest.mark.parametrize(("edit", "key"), [
    (("capability: text_generation", "capability: txt"), "models[0].capability"),
    (("{id: primary, serve: text}", "{id: primary, serve: text, colour: red}"), "models[0].pools[0].colour"),
    (("replicas: 0", "replicas: -1"), "models[0].pools[1].replicas"),
    (('default_version: "1"', 'default_version: "9"'), "models[0]"),
    (("input_tokens: 0.1", "input_tokens: -1"), "models[0].prices"),
    (("id: chat", "id: Chat Model"), "models[0].id"),
    (("{id: primary, serve: text}, {id: cloud", "{id: cloud, serve: text}, {id: cloud"), "models[0]"),
])
def test_bad_registries_name_the_offending_key(tmp_path, edit, key):
    with pytest.raises(RegistryError) as caught:
        load_registry(write(tmp_path, GOOD.replace(*edit)))
    assert f"  {key}:" in str(caught.value) and "registry.yaml" in str(caught.value)


def test_unreadable_registry_is_a_clear_error(tmp_path):
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml")
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(write(tmp_path, "models: [unclosed"))
    with pytest.raises(RegistryError, match="model ids repeat"):
        load_registry(write(tmp_path, GOOD + GOOD.split("models:")[1]))


def test_cache_policy_defaults_and_the_built_in_opt_ins(tmp_path):
    chat = load_registry(write(tmp_path, GOOD)).get("chat")
    assert chat is not None and chat.cache is None  # off unless the model opts in
    cached = load_registry(write(tmp_path, GOOD.replace("prices:", "cache: {ttl_s: 60}\n    prices:"))).get("chat")
    assert cached is not None and cached.cache is not None
    assert (cached.cache.enabled, cached.cache.ttl_s, cached.cache.scope) == (True, 60, "tenant")
    assert cached.cache.env() == {"AIMESH_CACHE_ENABLED": "true", "AIMESH_CACHE_TTL_S": "60.0",
                                  "AIMESH_CACHE_SCOPE": "tenant"}
    built_in = {m.capability for m in load_registry().models if m.cache is not None and m.cache.enabled}
    assert built_in == {Capability.EMBEDDING, Capability.TEXT_TO_SPEECH}


@pytest.mark.parametrize(("cache", "key", "message"), [
    ("{scope: everyone}", "models[0].cache.scope", "'tenant' or 'shared'"),
    ("{ttl_s: 0}", "models[0].cache.ttl_s", "greater than 0"),
    ("{ttl_s: 60, size: 3}", "models[0].cache.size", "Extra inputs"),
])
def test_bad_cache_policies_name_the_key(tmp_path, cache, key, message):
    with pytest.raises(RegistryError) as caught:
        load_registry(write(tmp_path, GOOD.replace("prices:", f"cache: {cache}\n    prices:")))
    assert f"  {key}:" in str(caught.value) and message in str(caught.value)


def test_speech_to_text_cannot_be_cached(tmp_path):
    stt = GOOD.replace("capability: text_generation", "capability: speech_to_text")
    with pytest.raises(RegistryError, match="speech_to_text answers are not deterministic"):
        load_registry(write(tmp_path, stt.replace("prices:", "cache: {enabled: true}\n    prices:")))
    off = load_registry(write(tmp_path, stt.replace("prices:", "cache: {enabled: false}\n    prices:")))
    assert off.models[0].cache is not None and not off.models[0].cache.enabled
