"""Models dispatched by accelerate (explicit device maps with CPU and disk offload, and a CUDA/CPU split where a
GPU exists) give the numbers of the plain model through every pipeline: node attribution, graph edges,
ablation, interventions, steering and describe.

Disk offload keeps a block's weights on the ``meta`` device outside its forward call and loads them through
accelerate's hooks, the same hooks that move tensors between GPUs, so it exercises on a CPU-only machine the
code paths a multi-GPU split takes (hooks that read weights, tensors combined across layers).
"""

from __future__ import annotations

import re
import tempfile
from itertools import chain

import pytest
import torch
from conftest import make_tiny, make_tiny_hf, word_tokenizer

from neurontrace.attribution.api import attribute
from neurontrace.describe import describe_all
from neurontrace.describe.contexts import _weights_fingerprint
from neurontrace.describe.writes import logit_effects
from neurontrace.errors import NeurontraceError
from neurontrace.evaluation.faithfulness import prepare_eval
from neurontrace.graphs.build import build_graph
from neurontrace.inspection import inspect_prompt
from neurontrace.interventions import Edit, intervene
from neurontrace.models.loading import load_model, parse_device_map
from neurontrace.models.model import NeuronModel
from neurontrace.models.placement import execution_device
from neurontrace.neurons import parse_neurons
from neurontrace.steering.steer import steer

# Llama: SwiGLU, untied; GPT-2: tied embeddings, biases, Conv1D, learned positions; Gemma 2: soft-cap, 1 + w norms
FAMILIES = ["llama", "gpt2", "gemma2"]
PROMPT = "the keys to the cabinet"
PAIRS = [
    dict(clean_prefix=PROMPT, patch_prefix="the key to the cabinet", clean_answer=" are", patch_answer=" is"),
    dict(
        clean_prefix="the dogs near the table",
        patch_prefix="the dog near the table",
        clean_answer=" are",
        patch_answer=" is",
    ),
]


def device_map_for(
    model: NeuronModel, layers: list, *, embed="disk", final_norm="disk", unembed="disk"
) -> dict:
    """An explicit device map: one entry per decoder layer, the embedding, final norm and unembedding, and the
    embedding's place (the CPU for disk) for any other module with weights or buffers (rotary embeddings,
    learned positions)."""
    a = model.adapter
    dm = {f"{a.layers}.{i}": layers[i % len(layers)] for i in range(model.n_layers)}
    dm |= {a.embed: embed, a.final_norm: final_norm, a.unembed: unembed}
    for name, _ in chain(model.hf.named_parameters(), model.hf.named_buffers()):
        if not any(name == k or name.startswith(k + ".") for k in dm):
            dm[name.rsplit(".", 1)[0]] = "cpu" if embed == "disk" else embed
    return dm


def dispatched(family: str, folder, layers: list, **kwargs) -> NeuronModel:
    from accelerate import dispatch_model

    model = make_tiny(family)
    main_device = kwargs.pop("main_device", None)
    dispatch_model(
        model.hf,
        device_map=device_map_for(model, layers, **kwargs),
        offload_dir=str(folder),
        main_device=main_device,
    )
    return model


def close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=rtol, atol=atol)


def n_offloaded(model: NeuronModel) -> int:
    return sum(p.device.type == "meta" for p in model.hf.parameters())


# ------------------------------------------------------------------------------------------- the checks
def check_attribution(ref: NeuronModel, model: NeuronModel, tol: dict) -> None:
    for method, extra in [("relp", {}), ("atp", {}), ("ig", {"steps": 3}), ("exact", {})]:
        want = attribute(ref, prompt=PROMPT, answer=" are", contrast=" is", method=method, **extra)
        got = attribute(model, prompt=PROMPT, answer=" are", contrast=" is", method=method, **extra)
        assert got.scores.dtype == torch.float32 and got.scores.abs().max() > 0
        close(got.scores, want.scores, **tol)
        close(got.metric_clean, want.metric_clean, **tol)
    # pairs and a mean baseline (activations of several prompts combined across layers)
    want = attribute(ref, pairs=PAIRS, method="relp")
    close(attribute(model, pairs=PAIRS, method="relp").scores, want.scores, **tol)
    prompts = dict(prompts=[PROMPT, "a dog runs"], answers=[" are", " near"], baseline="mean", method="atp")
    close(attribute(model, **prompts).scores_sum, attribute(ref, **prompts).scores_sum, **tol)


def check_graph(ref: NeuronModel, model: NeuronModel, tol: dict) -> None:
    want = build_graph(ref, PROMPT, answers=[" are", " is"], node_threshold=0.01)
    got = build_graph(model, PROMPT, answers=[" are", " is"], node_threshold=0.01)
    assert [n.key for n in got.nodes] == [n.key for n in want.nodes]
    assert want.n_edges > 100  # neuron-to-neuron edges too, not just embeddings
    close(got.adjacency, want.adjacency, **tol)


def check_ablation(ref: NeuronModel, model: NeuronModel, tol: dict) -> None:
    scores = attribute(ref, pairs=PAIRS, method="relp").mean_scores
    keep = scores.abs() >= scores.abs().quantile(0.9)
    for ablation in ("mean", "resample"):
        want, got = prepare_eval(ref, PAIRS, ablation=ablation), prepare_eval(model, PAIRS, ablation=ablation)
        for mask in (keep, ~keep, None):
            close(got.metric_with(mask), want.metric_with(mask), **tol)


def check_interventions(ref: NeuronModel, model: NeuronModel, tol: dict) -> None:
    batch = ref.tokenize([PROMPT, "a dog"])
    edits = [Edit(layer=1, neurons=[3, 7], op="zero"), Edit(layer=2, positions=[-1], op="scale", value=3.0)]
    with intervene(ref, edits):
        want = ref.logits(batch)
    with intervene(model, edits):
        got = model.logits(batch)
    assert (want - ref.logits(batch)).abs().max() > 1e-3  # the edits do something
    close(got, want, **tol)
    neurons = parse_neurons("L0/N5,L1/N3,L2/N11@-1")
    for kwargs in (
        dict(mode="scale", value=4.0, generate=4),
        dict(mode="patch", from_prompt="the key to the cabinet"),
    ):
        a = steer(ref, prompt=PROMPT, neurons=neurons, answers=[" are", " is"], **kwargs)
        b = steer(model, prompt=PROMPT, neurons=neurons, answers=[" are", " is"], **kwargs)
        assert a.kl_divergence > 1e-6
        close(b.kl_divergence, a.kl_divergence, rtol=1e-4, atol=1e-7)
        close([c.prob_after for c in b.answers], [c.prob_after for c in a.answers], **tol)
        assert b.generated_ids_after == a.generated_ids_after


def check_describe_and_inspect(ref: NeuronModel, model: NeuronModel, tol: dict) -> None:
    close(logit_effects(model, 2, 5), logit_effects(ref, 2, 5), **tol)
    assert _weights_fingerprint(model) == _weights_fingerprint(ref)  # the context cache key reads the weights
    neurons = parse_neurons("L1/N3,L2/N7+")
    texts = [
        "the keys to the cabinet are on the table",
        "a dog runs near the cabinets",
        "what is the capital",
    ]
    with tempfile.TemporaryDirectory() as cache:
        want, got = (
            describe_all(
                m, neurons, corpus=texts, window=8, max_tokens=200, progress=False, cache_dir=f"{cache}/{i}"
            )
            for i, m in enumerate((ref, model))
        )
    for a, b in zip(want, got, strict=True):
        for pa, pb in zip(a.polarities, b.polarities, strict=True):
            close([t.value for t in pb.writes.promoted], [t.value for t in pa.writes.promoted], **tol)
            close(
                [c.activation for c in pb.contexts.contexts],
                [c.activation for c in pa.contexts.contexts],
                **tol,
            )
    kwargs = dict(counterfactual="the key to the cabinet", zero=neurons, answer=" are", contrast=" is")
    a, b = inspect_prompt(ref, PROMPT, **kwargs), inspect_prompt(model, PROMPT, **kwargs)
    assert [n.neuron for n in b.most_changed] == [n.neuron for n in a.most_changed]
    close(b.answer.logit_diff_after_zero, a.answer.logit_diff_after_zero, **tol)


def check_everything(ref: NeuronModel, model: NeuronModel, tol: dict | None = None) -> None:
    tol = tol or {}
    check_attribution(ref, model, tol)
    check_graph(ref, model, tol)
    check_ablation(ref, model, tol)
    check_interventions(ref, model, tol)
    check_describe_and_inspect(ref, model, tol)


# ------------------------------------------------------------------------------------------- CPU + disk
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_and_disk_offload_match_the_plain_model(family, tmp_path):
    ref = make_tiny(family)
    model = dispatched(family, tmp_path / "offload", ["cpu", "disk", "cpu"])
    assert n_offloaded(model) > 0 and model.device == torch.device("cpu")  # the embedding itself is on disk
    flags = {name: p.requires_grad for name, p in model.hf.named_parameters()}
    check_everything(ref, model)
    assert n_offloaded(model) > 0  # still offloaded afterwards, and gradient flags as they were
    assert {name: p.requires_grad for name, p in model.hf.named_parameters()} == flags


def test_bfloat16_with_disk_offload_matches_bfloat16(tmp_path):
    ref = make_tiny("llama")
    ref.hf.to(torch.bfloat16)
    model = make_tiny("llama")
    model.hf.to(torch.bfloat16)
    from accelerate import dispatch_model

    dispatch_model(model.hf, device_map=device_map_for(model, ["disk", "cpu"]), offload_dir=str(tmp_path))
    assert n_offloaded(model) > 0
    check_attribution(ref, model, {})
    check_graph(ref, model, {})


# ------------------------------------------------------------------------------------ load_model(folder)
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_tiny_hf(request.param).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_load_model_with_an_explicit_map_and_offload_folder(saved, tmp_path):
    ref = load_model(str(saved), device="cpu")
    # transformers cannot load tied embeddings split between the CPU and disk (GPT-2): keep those together
    tied = getattr(ref.config, "tie_word_embeddings", False)
    layout = device_map_for(ref, ["disk", "cpu", "disk"], embed="disk" if tied else "cpu", unembed="disk")
    model = load_model(str(saved), device_map=layout, offload_folder=tmp_path / "offload")
    assert n_offloaded(model) > 0
    assert model.hf.hf_device_map == layout
    check_everything(ref, model)


def test_load_model_auto_map_spills_to_disk(saved, tmp_path):
    ref = load_model(str(saved), device="cpu")
    model = load_model(str(saved), device_map="auto", max_memory={"cpu": "40KB"}, offload_folder=tmp_path)
    assert "disk" in model.hf.hf_device_map.values() and n_offloaded(model) > 0
    check_attribution(ref, model, {})


def test_device_map_options_fail_in_one_line(tmp_path):
    assert parse_device_map(None) is None and parse_device_map("auto") == "auto"
    assert parse_device_map('{"model.layers.0": "cpu", "": 0}') == {"model.layers.0": "cpu", "": 0}
    path = tmp_path / "map.json"
    path.write_text('{"lm_head": "disk"}')
    assert parse_device_map(str(path)) == {"lm_head": "disk"}
    for bad in ("everywhere", "{not json", '["cpu"]', '{"lm_head": [0]}'):
        with pytest.raises(NeurontraceError) as info:
            parse_device_map(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(NeurontraceError, match="only apply with a device_map"):
        load_model("smollm2-135m", offload_folder=tmp_path)


# ------------------------------------------------------------------------------------------ CUDA + CPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_TOL = {"rtol": 1e-4, "atol": 1e-5}  # GPU kernels sum in another order than the CPU reference


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_layers_split_between_cuda_and_cpu(family, tmp_path):
    """Layers that compute on different devices (cuda:0 and the CPU, which is then the main device)."""
    ref = make_tiny(family)
    model = dispatched(
        family, tmp_path, [0, "cpu", 0], embed=0, final_norm="cpu", unembed=0, main_device="cpu"
    )
    assert {execution_device(model.layer(i)).type for i in range(model.n_layers)} == {"cuda", "cpu"}
    check_everything(ref, model, GPU_TOL)


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_and_disk_offload_onto_cuda(family, tmp_path):
    """cuda:0 as the main device: CPU- and disk-offloaded blocks are loaded onto it at their forward call."""
    ref = make_tiny(family)
    tied = family == "gpt2"  # tied embeddings stay together
    model = dispatched(
        family, tmp_path, [0, "cpu", "disk"], embed="cpu", final_norm="disk", unembed="cpu" if tied else 0
    )
    assert model.device.type == "cuda" and n_offloaded(model) > 0
    check_everything(ref, model, GPU_TOL)


def test_cli_device_map_and_offload_folder(saved, tmp_path, capsys, monkeypatch):
    import json

    from neurontrace.cli import main
    from neurontrace.commands import _common

    loaded = []
    monkeypatch.setattr(
        _common, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1]
    )
    layout = device_map_for(load_model(str(saved), device="cpu"), ["cpu", "disk"], embed="disk")
    argv = ["attribute", "--model", str(saved), "--prompt", PROMPT, "--answer", " are", "--contrast", " is"]
    argv += ["--top", "8", "--verify", "8"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    extra = ["--device-map", json.dumps(layout), "--offload-folder", str(tmp_path)]
    assert main([*argv, *extra]) == 0
    dispatched_out = capsys.readouterr().out
    assert "exact" in plain
    # the same table; printed numbers may differ in the last digit (offloaded blocks sum in another order)
    number = r"-?\d+\.\d+"
    assert re.sub(number, "#", dispatched_out) == re.sub(number, "#", plain)
    got = [float(x) for x in re.findall(number, dispatched_out)]
    want = [float(x) for x in re.findall(number, plain)]
    assert got == pytest.approx(want, abs=2e-5, rel=1e-4)
    assert n_offloaded(loaded[0]) == 0 and n_offloaded(loaded[1]) > 0
