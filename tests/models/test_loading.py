"""Loading: local folders (the path hub models take), device maps, and one-line errors for bad specs."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import make_tiny_hf, word_tokenizer

from neurontrace.errors import ModelLoadError, UnsupportedArchitectureError
from neurontrace.models.loading import load_model, resolve_spec


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama saved like a downloaded hub snapshot (config.json, safetensors, tokenizer files)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf = make_tiny_hf("llama")
    hf.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder, hf


def test_local_folder_loads_the_same_model(tiny_folder):
    folder, hf = tiny_folder
    model = load_model(str(folder), device="cpu")
    assert model.adapter.family == "Llama" and model.n_layers == 3 and model.d_ff == 48
    batch = model.tokenize(["the keys to the cabinet", "a dog"])
    with torch.no_grad():
        expected = hf(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
    torch.testing.assert_close(model.logits(batch), expected.logits)
    assert next(model.hf.parameters()).dtype == torch.float32


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_device_map_passes_through_to_accelerate(tiny_folder, device_map):
    folder, hf = tiny_folder
    model = load_model(str(folder), device_map=device_map)
    assert model.device == torch.device("cpu")
    batch = model.tokenize("the keys")
    torch.testing.assert_close(model.logits(batch)[0], hf(batch.input_ids).logits[0])


def test_bfloat16_load(tiny_folder):
    model = load_model(str(tiny_folder[0]), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 600
    return message


@pytest.mark.parametrize("offline_env", ["1", "0"])
def test_unknown_hub_id_without_network_fails_fast(monkeypatch, offline_env):
    """Offline (env) or unreachable (no DNS here): one line, and no 25 s of hub retries."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    monkeypatch.setattr("neurontrace.models.loading.hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-org/no-such-model")
    message = _one_line(info)
    assert "no-such-org/no-such-model" in message and "Hugging Face" in message
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("spec", ["./missing-model", "/nowhere/model.gguf", "missing.gguf", "a/b/c", ""])
def test_missing_file_or_folder(spec):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert "no such model file" in _one_line(info) or "no model given" in _one_line(info)


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(bad))
    assert "could not read GGUF file" in _one_line(info)


def test_file_that_is_not_a_model(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf model"):
        load_model(str(other))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(str(tmp_path))


def test_corrupt_weights_in_folder(tmp_path, tiny_folder):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_folder[0] / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder))
    assert "could not load model" in _one_line(info)


def test_unsupported_architecture(tmp_path):
    tf.BertConfig(
        num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tmp_path))
    assert "unsupported architecture 'bert'" in _one_line(info)


def test_alias_resolves_offline_to_the_packaged_gguf():
    resolved = resolve_spec("smollm2-135m")
    assert resolved.kind == "gguf" and resolved.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
