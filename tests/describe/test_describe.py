"""Neuron descriptions: the writes vector equals a direct computation and a real intervention at fixed norm
scale, polarity swaps roles, a corpus scan finds the true top activations (recomputed fresh), the scan cache
is reused without running the model, the model-sampled corpus works offline, CLI and bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import FAMILIES, make_tiny, save_tiny_folder

from neurontrace.cli import _add_model_args
from neurontrace.commands.describe import add_describe_parser, run_describe
from neurontrace.describe import describe, describe_writes, logit_effects, top_contexts
from neurontrace.describe.contexts import windows_from_texts
from neurontrace.errors import NeurontraceError
from neurontrace.interventions import Edit, intervene
from neurontrace.neurons import NeuronId, parse_neuron
from neurontrace.sites import capture
from neurontrace.tokens import Batch

TEXT = """the keys to the cabinet are on the table . the dog near the tables runs . what is the capital of the
state of texas ? austin is the capital of texas . sacramento is the capital of california . one plus two
equals three . two plus two equals four . the dogs run near the cabinet that is on the table .
three plus four equals seven . the key to the cabinets is near the dog . five plus one equals six ."""


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def _direct_effects(model, layer: int, index: int) -> torch.Tensor:
    """The logit-effect vector computed from the Hugging Face modules by hand."""
    return _direct(model, layer, index).detach()


def _direct(model, layer: int, index: int) -> torch.Tensor:
    hf_layer = model.layer(layer)
    down = model.down_proj(layer).weight
    w = (down[index] if model.adapter.down_is_conv1d else down[:, index]).float()
    offset = 1.0 if model.adapter.norm_kind == "rms_offset" else 0.0
    norms = [getattr(hf_layer, "post_feedforward_layernorm", None), model.final_norm]
    for norm in norms:
        if norm is None:
            continue
        if model.adapter.norm_kind == "layernorm":
            w = w - w.mean()
        if getattr(norm, "weight", None) is not None:
            w = w * (offset + norm.weight.float())
    return model.hf.get_output_embeddings().weight.float() @ w


@pytest.mark.parametrize("family", FAMILIES)
def test_promoted_tokens_match_a_direct_computation(family):
    model = make_tiny(family)
    for layer, index in ((0, 3), (model.n_layers - 1, 11)):
        direct = _direct_effects(model, layer, index)
        torch.testing.assert_close(logit_effects(model, layer, index), direct, rtol=1e-5, atol=1e-6)
        desc = describe_writes(model, NeuronId(layer, index, "+"), k=5)
        assert [t.token_id for t in desc.promoted] == direct.topk(5).indices.tolist()
        assert [t.token_id for t in desc.suppressed] == direct.topk(5, largest=False).indices.tolist()
        assert desc.promoted[0].value == pytest.approx(float(direct.max()), rel=1e-5)
        assert desc.promoted[0].token == model.tokenizer.decode([desc.promoted[0].token_id])


def _freeze_norm_scales(model, norms):
    """Hooks that hold each norm's scale at its value in the first (clean) run, using the module's own output:
    ``(out - bias) * scale_clean / scale(x) + bias``. Returns the handles and the recorded clean scales."""
    layernorm = model.adapter.norm_kind == "layernorm"
    clean: dict[int, torch.Tensor] = {}

    def scale(norm, x):
        eps = next(
            (
                getattr(norm, a)
                for a in ("variance_epsilon", "eps")
                if isinstance(getattr(norm, a, None), float)
            ),
            1e-5,
        )
        x = x.float()
        if layernorm:
            x = x - x.mean(-1, keepdim=True)
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def hook(norm):
        def fn(_mod, args, out):
            s = scale(norm, args[0])
            if id(norm) not in clean:
                clean[id(norm)] = s
                return None
            bias = getattr(norm, "bias", None)
            bias = 0.0 if bias is None else bias
            return (out - bias) * (clean[id(norm)] / s) + bias

        return fn

    return [n.register_forward_hook(hook(n)) for n in norms], clean


@pytest.mark.parametrize("family", FAMILIES)
def test_writes_equal_a_real_intervention_at_fixed_norm_scale(family):
    """Adding delta to a last-layer neuron at the last position changes the logits there by delta times the
    writes vector times the (clean) norm scale factors, once the norms' scales are held constant."""
    model = make_tiny(family)
    last, index, delta = model.n_layers - 1, 11, 0.5
    batch = model.tokenize("the keys to the cabinet")
    norms = [model.final_norm]
    post = getattr(model.layer(last), "post_feedforward_layernorm", None)
    if post is not None:
        norms.append(post)
    handles, clean_scales = _freeze_norm_scales(model, norms)
    try:
        clean = model.logits(batch)[0, -1]
        with intervene(model, Edit(layer=last, neurons=[index], positions=[-1], op="add", value=delta)):
            edited = model.logits(batch)[0, -1]
    finally:
        for h in handles:
            h.remove()
    cap = model.logit_softcap
    if cap:  # undo the (monotonic) soft-cap to compare pre-cap logits
        clean, edited = cap * torch.atanh(clean / cap), cap * torch.atanh(edited / cap)
    factor = 1.0
    for n in norms:
        factor *= float(clean_scales[id(n)][0, -1])
    effects = logit_effects(model, last, index)
    torch.testing.assert_close(edited - clean, delta * factor * effects, rtol=1e-4, atol=2e-6)
    assert (edited - clean).topk(3).indices.tolist() == effects.topk(3).indices.tolist()


def test_negative_polarity_swaps_promoted_and_suppressed(llama):
    pos = describe_writes(llama, parse_neuron("L1/N3+"), k=4)
    neg = describe_writes(llama, parse_neuron("L1/N3-"), k=4)
    unsigned = describe_writes(llama, parse_neuron("L1/N3@-1"), k=4)
    assert neg.polarity == "-" and neg.neuron == "L1/N3-" and unsigned.neuron == "L1/N3+"
    assert [t.token_id for t in neg.promoted] == [t.token_id for t in pos.suppressed]
    assert [t.value for t in neg.promoted] == [-t.value for t in pos.suppressed]
    assert [t.token_id for t in neg.suppressed] == [t.token_id for t in pos.promoted]
    assert unsigned.promoted == pos.promoted
    assert json.loads(pos.to_json())["schema_version"] == 1


# ------------------------------------------------------------------------------------------------- contexts
@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_contexts_are_the_true_top_activations_and_match_a_fresh_capture(llama, corpus_file, tmp_path):
    window, k = 16, 5
    neurons = [parse_neuron("L1/N3"), parse_neuron("L2/N40-")]
    found = top_contexts(
        llama,
        neurons,
        corpus=corpus_file,
        k=k,
        window=window,
        batch_size=3,
        progress=False,
        cache_dir=tmp_path,
    )
    assert set(found) == {NeuronId(1, 3, "+"), NeuronId(1, 3, "-"), NeuronId(2, 40, "-")}
    windows = windows_from_texts(llama, [TEXT], window=window, max_tokens=20_000)
    assert len(windows) > 3 and all(len(w) <= window for w in windows)
    # every activation of the corpus, computed one window at a time
    every = {layer: [capture(llama, Batch.from_ids([w])).get(layer)[0] for w in windows] for layer in (1, 2)}
    for key, desc in found.items():
        assert desc.polarity == key.sign and len(desc.contexts) == k and desc.window == window
        for ctx in desc.contexts:
            fresh = float(every[key.layer][ctx.window][ctx.position, key.index])
            assert ctx.activation == pytest.approx(fresh, abs=1e-5)
            assert ctx.token == llama.tokenizer.decode([windows[ctx.window][ctx.position]])
            assert len(ctx.before) == min(8, ctx.position)
        values = torch.cat([a[1:, key.index] for a in every[key.layer]])  # a window's first token is skipped
        want = values.topk(k).values if key.sign == "+" else -(-values).topk(k).values
        got = torch.tensor([c.activation for c in desc.contexts])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert desc.n_tokens == sum(len(w) - 1 for w in windows)
        assert all(c.position > 0 for c in desc.contexts)


def test_scan_cache_is_reused_without_running_the_model(llama, corpus_file, tmp_path):
    calls = []
    handle = llama.hf.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        opts = dict(corpus=corpus_file, k=3, window=16, progress=False, cache_dir=tmp_path)
        first = top_contexts(llama, [parse_neuron("L1/N3+")], **opts)
        assert len(calls) > 0
        calls.clear()
        again = top_contexts(llama, [parse_neuron("L1/N3+"), parse_neuron("L1/N7-")], **opts)
        assert calls == []  # another neuron of a scanned layer is free
        assert again[NeuronId(1, 3, "+")] == first[NeuronId(1, 3, "+")]
        top_contexts(llama, [parse_neuron("L0/N1")], **opts)
        n_new_layer = len(calls)
        assert n_new_layer > 0  # a new layer is scanned (only that layer)
        calls.clear()
        top_contexts(llama, [parse_neuron("L1/N3+")], **opts, use_cache=False)
        assert len(calls) == n_new_layer
        calls.clear()
        top_contexts(llama, [parse_neuron("L1/N3+")], **{**opts, "window": 12})
        assert len(calls) > 0  # another window size is another cache entry
    finally:
        handle.remove()
    other_weights = make_tiny("llama", seed=1)  # same name, other weights: never the same cache entry
    calls_other = []
    h = other_weights.hf.register_forward_pre_hook(lambda *_: calls_other.append(1))
    try:
        top_contexts(other_weights, [parse_neuron("L1/N3+")], **opts)
    finally:
        h.remove()
    assert calls_other


def test_model_sampled_corpus_works_offline_and_is_reproducible(llama, tmp_path):
    rng = torch.get_rng_state()
    opts = dict(corpus="model", k=4, window=24, max_tokens=300, progress=False)
    first = top_contexts(llama, [parse_neuron("L2/N5")], cache_dir=tmp_path / "a", **opts)
    second = top_contexts(llama, [parse_neuron("L2/N5")], cache_dir=tmp_path / "b", **opts)
    assert torch.equal(torch.get_rng_state(), rng)  # sampling does not disturb the caller's random state
    assert first == second
    desc = first[NeuronId(2, 5, "+")]
    assert desc.corpus == "text sampled from the model" and 300 <= desc.n_tokens < 360
    assert len(desc.contexts) == 4 and all(c.activation > 0 for c in desc.contexts)


def test_folder_and_list_corpora(llama, tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    half = len(TEXT) // 2
    (folder / "a.txt").write_text(TEXT[:half])
    (folder / "sub" / "b.txt").write_text(TEXT[half:])
    (folder / "ignored.md").write_text("the the the the the the the")
    opts = dict(k=3, window=16, progress=False, cache_dir=tmp_path / "cache")
    from_folder = top_contexts(llama, [parse_neuron("L1/N3+")], corpus=folder, **opts)
    from_list = top_contexts(llama, [parse_neuron("L1/N3+")], corpus=[TEXT[:half], TEXT[half:]], **opts)
    assert from_folder[NeuronId(1, 3, "+")].contexts == from_list[NeuronId(1, 3, "+")].contexts


def test_describe_combines_both_parts(llama, corpus_file, tmp_path):
    desc = describe(
        llama, parse_neuron("L1/N3"), corpus=corpus_file, k=3, window=16, progress=False, cache_dir=tmp_path
    )
    assert [p.polarity for p in desc.polarities] == ["+", "-"]
    assert desc.polarities[1].writes.promoted == describe_writes(llama, parse_neuron("L1/N3-"), k=3).promoted
    text = desc.format()
    assert "L1/N3+: when it fires positively" in text and "fires most negatively on" in text
    assert repr(desc.polarities[0].writes.promoted[0].token) in text
    assert repr(desc.polarities[0].contexts.contexts[0].token) in text
    data = json.loads(desc.to_json())
    assert data["schema_version"] == 1 and len(data["polarities"]) == 2
    writes_only = describe(llama, parse_neuron("L1/N3-"), k=3)
    assert [p.polarity for p in writes_only.polarities] == ["-"] and writes_only.polarities[
        0
    ].contexts is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(corpus="/no/such/corpus.txt"), "is not a file or folder"),
        (dict(neurons=[parse_neuron("L7/N1")]), "neuron L7/N1 does not exist"),
        (dict(window=65), "window must be between"),
        (dict(corpus=[]), "empty list"),
        (dict(k=0), "at least 1"),
    ],
)
def test_bad_context_requests_are_clear_errors(llama, tmp_path, kwargs, message):
    args = dict(neurons=[parse_neuron("L1/N3")], corpus=[TEXT], progress=False, cache_dir=tmp_path) | kwargs
    with pytest.raises(NeurontraceError, match=message):
        top_contexts(llama, **args)


def test_empty_folder_and_missing_datasets_package(llama, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeurontraceError, match=r"has no \.txt files"):
        top_contexts(llama, [parse_neuron("L1/N3")], corpus=tmp_path / "empty", cache_dir=tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(NeurontraceError, match="needs the datasets package"):
        top_contexts(llama, [parse_neuron("L1/N3")], corpus="hf:wikitext", cache_dir=tmp_path, progress=False)


# -------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("describe-model")
    return save_tiny_folder(path)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="neurontrace")
    sub = parser.add_subparsers(dest="command")
    add_describe_parser(sub, _add_model_args)
    return parser.parse_args(argv)


def test_cli_describe(folder, corpus_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEURONTRACE_HOME", str(tmp_path / "home"))
    out_json = tmp_path / "describe.json"
    argv = ["describe", "--model", folder, "--device", "cpu", "L1/N3+", "L2/N5-,L0/N1"]
    argv += ["--corpus", str(corpus_file), "--k", "3", "--window", "16", "--json", str(out_json)]
    run_describe(_parse(argv))
    out = capsys.readouterr().out
    assert "L1/N3+: when it fires positively" in out and "L2/N5-: when it fires negatively" in out
    assert "L0/N1-: when it fires negatively" in out and "fires most positively on" in out
    data = json.loads(out_json.read_text())
    assert data["schema_version"] == 1 and [d["neuron"] for d in data["neurons"]] == [
        "L1/N3+",
        "L2/N5-",
        "L0/N1",
    ]
    assert (tmp_path / "home" / "contexts").is_dir()  # the scan is cached under NEURONTRACE_HOME
    run_describe(_parse(["describe", "--model", folder, "L1/N3", "--corpus", "none"]))
    assert "fires most" not in capsys.readouterr().out
    with pytest.raises(NeurontraceError, match="cannot read neuron"):
        run_describe(_parse(["describe", "--model", folder, "L1-N3"]))


# ------------------------------------------------------------------------------------------ default model
@pytest.mark.default_model
def test_default_model_writes_equal_a_real_intervention(default_model):
    model = default_model
    last, index, delta = model.n_layers - 1, 100, 1.0
    batch = model.tokenize("The keys to the cabinet")
    handles, clean_scales = _freeze_norm_scales(model, [model.final_norm])
    try:
        clean = model.logits(batch)[0, -1]
        with intervene(model, Edit(layer=last, neurons=[index], positions=[-1], op="add", value=delta)):
            edited = model.logits(batch)[0, -1]
    finally:
        for h in handles:
            h.remove()
    expected = delta * float(clean_scales[id(model.final_norm)][0, -1]) * logit_effects(model, last, index)
    torch.testing.assert_close(edited - clean, expected, rtol=1e-3, atol=1e-4)
    desc = describe_writes(model, NeuronId(last, index, "+"), k=5)
    assert [t.token_id for t in desc.promoted] == (edited - clean).topk(5).indices.tolist()
