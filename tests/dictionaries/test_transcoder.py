"""Transcoders in circuit-tracer's format, and the ``transcoder:DIR`` site that splices them in as the MLP's output.

The format is checked two ways: against the layout read from circuit-tracer 0.5.0's source (file names, tensor
names, shapes and orientation; ``single_layer_transcoder.py``, ``utils/caching.py``), and, where circuit-tracer is
installed, by loading a folder written by :func:`save_transcoders` with circuit-tracer's own local-folder loader
(``load_transcoders_from_cache``) and a folder written by circuit-tracer's ``to_safetensors`` with ours, comparing
encode / decode values. circuit-tracer 0.5.0's ``utils.hf_utils`` imports a constant that huggingface_hub 2.x no
longer has (``HF_HUB_ENABLE_HF_TRANSFER``); the test sets it (to False, its old default) before importing.

Attribution identities (per example and layer, scores summed over positions and over the site's components;
``g = dm/d(MLP output)``, ``u`` the MLP input, ``'`` the counterfactual run). The transcoder site's gradient is
``g @ W_dec.T`` on the latents and ``g`` on the error, and ``f @ W_dec + error = y - b_dec - u @ W_skip``, so:

- zero baseline: ``sum(latents + errors) = sum(raw mlp_out) - sum_t (b_dec + u_t @ W_skip) . g_t``;
- pair baseline: ``sum(latents + errors) = sum(raw mlp_out) - sum_t ((u'_t - u_t) @ W_skip) . g_t`` (``b_dec``
  is in both runs and cancels).

They hold for AtP and RelP alike (the spliced model computes the same values, so RelP's frozen factors are the
same, and the backward pass through the splice is the MLP's own: the encoder's paths cancel).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import yaml
from conftest import FAMILIES, make_tiny

from neurontrace.attribution.api import attribute
from neurontrace.attribution.engine import run_sites
from neurontrace.attribution.metrics import make_metric
from neurontrace.attribution.replacement import RelPRules
from neurontrace.dictionaries import (
    Transcoder,
    TranscoderSet,
    load_transcoders,
    resolve_dictionary,
    save_transcoders,
)
from neurontrace.dictionaries.hub import parse_hub_spec
from neurontrace.errors import NeurontraceError
from neurontrace.sites import capture, check_site, hook_site, site_layers, site_width
from neurontrace.tasks.pairs import Pair
from neurontrace.tokens import single_token_id, tokenize_pairs

PAIRS = [
    Pair("the keys to the cabinet", "the key to the cabinet", " are", " is"),
    Pair("the key to the cabinets", "the keys to the cabinets", " is", " are"),
]
PROMPTS, ANSWERS = ["the keys to the cabinet", "the dog near the table"], [" are", " is"]
ARCHS = ["relu", "jumprelu", "topk"]


def random_transcoder(d: int, d_sae: int, layer: int, architecture: str = "topk", *, skip: bool = False,
                      seed: int = 0, d_in: int | None = None) -> Transcoder:  # fmt: skip
    g = torch.Generator().manual_seed(seed + 101 * layer)
    d_in = d if d_in is None else d_in
    return Transcoder(
        torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        torch.randn(d_sae, generator=g) * 0.1,
        torch.randn(d_sae, d, generator=g) / d_sae**0.5,
        torch.randn(d, generator=g) * 0.3,
        layer,
        architecture,
        k=5 if architecture == "topk" else None,
        threshold=torch.rand(d_sae, generator=g) * 0.2 if architecture == "jumprelu" else None,
        W_skip=torch.randn(d_in, d, generator=g) * 0.1 if skip else None,
    )


def write_set(folder, model, layers=(0, 2), architecture="topk", *, skip=False, d_sae=64) -> str:
    tcs = {L: random_transcoder(model.d_model, d_sae, L, architecture, skip=skip) for L in layers}
    save_transcoders(tcs, folder, model_name=model.name)
    return f"transcoder:{folder}"


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def mlp_io(model, layer: int):
    """Record layer ``layer``'s MLP input and output with a plain torch hook (not a site): (store, handle)."""
    store: dict[str, list[torch.Tensor]] = {"u": [], "y": []}

    def hook(_m, args, out):
        store["u"].append(args[0].detach())
        store["y"].append(out.detach())

    return store, model.layer_module(layer, model.adapter.mlp).register_forward_hook(hook)


# ------------------------------------------------------------------------------------------------ the maths
def test_encoding_and_decoding_by_hand():
    eye = torch.eye(3)
    base = dict(W_enc=eye, b_enc=torch.zeros(3), W_dec=2 * eye, b_dec=torch.tensor([0.0, 0.0, 1.0]), layer=0)
    x = torch.tensor([[0.5, -1.0, 2.0]])
    relu = Transcoder(**base, architecture="relu")
    assert relu.encode(x).tolist() == [[0.5, 0.0, 2.0]] and relu.decode(relu.encode(x)).tolist() == [
        [1.0, 0.0, 5.0]
    ]
    # circuit-tracer's JumpReLU: pre * (pre > threshold), so a negative threshold lets a negative value through
    jump = Transcoder(**base, architecture="jumprelu", threshold=torch.tensor([0.6, -2.0, 1.0]))
    assert jump.encode(x).tolist() == [[0.0, -1.0, 2.0]]
    assert Transcoder(**base, k=1).encode(x).tolist() == [[0.0, 0.0, 2.0]]  # topk is the default architecture
    skip = Transcoder(**base, architecture="relu", W_skip=torch.ones(3, 3))
    assert skip.decode(skip.encode(x), x).tolist() == [[2.5, 1.5, 6.5]]  # + x @ W_skip = 1.5 everywhere
    assert skip.reconstruct(x).tolist() == [[2.5, 1.5, 6.5]]
    with pytest.raises(NeurontraceError, match="needs its input x"):
        skip.decode(skip.encode(x))
    assert (relu.d_in, relu.d_sae, relu.d_out) == (3, 3, 3)
    moved = skip.to(dtype=torch.float64)
    assert moved.W_skip.dtype == torch.float64 and moved.layer == 0


# ------------------------------------------------------------------------------------------------ the format
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("architecture", ARCHS)
def test_save_writes_circuit_tracers_layout_and_loads_back(tmp_path, architecture, skip):
    tcs = {L: random_transcoder(32, 48, L, architecture, skip=skip) for L in (0, 1, 2)}
    folder = save_transcoders(tcs, tmp_path / "tc", model_name="tiny-llama")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml",
        *(f"layer_{i}.safetensors" for i in range(3)),
    ]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    # what circuit-tracer's loaders read (utils/caching.py, utils/hf_utils.py)
    assert {k: config[k] for k in ("model_kind", "feature_input_hook", "feature_output_hook", "model_name")} == {
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "model_name": "tiny-llama"}  # fmt: skip
    assert config["activation_function"] == architecture and config.get("k") == tcs[0].k
    from safetensors.torch import load_file

    raw = load_file(folder / "layer_1.safetensors")
    want = {"W_enc": (48, 32), "W_dec": (48, 32), "b_enc": (48,), "b_dec": (32,)}
    if architecture == "jumprelu":
        want["activation_function.threshold"] = (48,)
    if skip:
        want["W_skip"] = (32, 32)
    assert {k: tuple(v.shape) for k, v in raw.items()} == want  # circuit-tracer's names and orientation
    torch.testing.assert_close(raw["W_enc"], tcs[1].W_enc.T, rtol=0, atol=0)  # saved weights: a copy, exact
    if skip:
        torch.testing.assert_close(raw["W_skip"], tcs[1].W_skip.T, rtol=0, atol=0)  # it applies x @ W_skip.T

    back = load_transcoders(folder)
    assert (back.layers, back.input_hook, back.output_hook, back.model_name) == (
        [0, 1, 2], "mlp.hook_in", "mlp.hook_out", "tiny-llama")  # fmt: skip
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1))
    for layer, tc in tcs.items():
        got = back[layer]
        assert (got.layer, got.architecture, got.k) == (layer, architecture, tc.k)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            a, b = getattr(tc, name), getattr(got, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
        # the same weights (a copy) through the same kernels on the same shapes: exact
        assert torch.equal(got.encode(x), tc.encode(x)) and (got.encode(x) != 0).any()
        assert torch.equal(got.reconstruct(x), tc.reconstruct(x))


def test_saving_fewer_layers_removes_the_old_layer_files(tmp_path):
    folder = tmp_path / "tc"
    save_transcoders({L: random_transcoder(8, 16, L) for L in (0, 1, 2)}, folder, model_name="m")
    save_transcoders({0: random_transcoder(8, 16, 0, seed=5)}, folder, model_name="m")
    assert load_transcoders(folder).layers == [0]


def _circuit_tracer(monkeypatch):
    pytest.importorskip("circuit_tracer")
    import huggingface_hub.constants

    # circuit-tracer 0.5.0 imports this constant, which huggingface_hub 2.x dropped (False was its default)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ENABLE_HF_TRANSFER", False, raising=False)
    return importlib.import_module("circuit_tracer.utils.caching")


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_circuit_tracer_loads_what_save_writes(tmp_path, monkeypatch, architecture, skip):
    caching = _circuit_tracer(monkeypatch)
    tcs = {L: random_transcoder(32, 48, L, architecture, skip=skip) for L in (0, 1, 2)}
    save_transcoders(tcs, tmp_path / "cache" / "mine", model_name="tiny")
    theirs, _ = caching.load_transcoders_from_cache(
        "mine", cache_dir=tmp_path / "cache", device=torch.device("cpu")
    )
    assert (theirs.n_layers, theirs.feature_input_hook, theirs.feature_output_hook) == (
        3,
        "mlp.hook_in",
        "mlp.hook_out",
    )
    assert theirs.skip_connection == skip
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer, tc in tcs.items():
            f = theirs[layer].encode(x)
            torch.testing.assert_close(f, tc.encode(x), rtol=1e-6, atol=1e-6)
            assert (f != 0).any()
            torch.testing.assert_close(
                theirs[layer].decode(f, x), tc.decode(tc.encode(x), x), rtol=1e-6, atol=1e-6
            )


def test_circuit_tracer_reads_a_topk_folder_as_relu(tmp_path, monkeypatch):
    """circuit-tracer has no TopK per-layer transcoder: its loader takes a folder without thresholds as ReLU."""
    caching = _circuit_tracer(monkeypatch)
    tc = random_transcoder(32, 48, 0, "topk")
    save_transcoders({0: tc}, tmp_path / "cache" / "k", model_name="tiny")
    theirs, _ = caching.load_transcoders_from_cache(
        "k", cache_dir=tmp_path / "cache", device=torch.device("cpu")
    )
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    as_relu = Transcoder(tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec, 0, "relu")
    with torch.no_grad():
        torch.testing.assert_close(theirs[0].encode(x), as_relu.encode(x), rtol=1e-6, atol=1e-6)
    assert load_transcoders(tmp_path / "cache" / "k")[0].architecture == "topk"  # neurontrace reads config k


@pytest.mark.parametrize("skip", [False, True])
def test_a_folder_written_by_circuit_tracer_loads(tmp_path, monkeypatch, skip):
    _circuit_tracer(monkeypatch)
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    g = torch.Generator().manual_seed(3)
    theirs = {}
    for layer in (0, 1):
        tc = SingleLayerTranscoder(32, 48, JumpReLU(torch.rand(48, generator=g) * 0.2, 0.1), layer,
                                   skip_connection=skip, device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            tc.activation_function.threshold.abs_()
        theirs[layer] = tc
    TranscoderSet(theirs, "mlp.hook_in", "hook_mlp_out").to_safetensors(str(tmp_path / "ct"))
    (tmp_path / "ct" / "config.yaml").write_text(yaml.safe_dump(
        {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}))  # fmt: skip
    ours = load_transcoders(tmp_path / "ct")
    assert ours.layers == [0, 1] and ours.output_hook == "hook_mlp_out"
    x = torch.randn(6, 32, generator=g)
    with torch.no_grad():
        for layer, tc in theirs.items():
            f = ours[layer].encode(x)
            assert ours[layer].architecture == "jumprelu" and (f != 0).any()
            torch.testing.assert_close(f, tc.encode(x), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ours[layer].decode(f, x), tc.decode(f, x), rtol=1e-6, atol=1e-6)


def test_gemma_scope_2_tensor_names_and_a_listed_set(tmp_path):
    """Gemma Scope 2's names (``w_enc [d_model, d_sae]``, ``affine_skip_connection``), files listed in config.yaml."""
    from safetensors.torch import save_file

    tc = random_transcoder(16, 24, 0, "jumprelu", skip=True)
    (tmp_path / "layer_0_width_24").mkdir()
    save_file({"w_enc": tc.W_enc, "w_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec, "threshold": tc.threshold,
               "affine_skip_connection": tc.W_skip}, tmp_path / "layer_0_width_24" / "params.safetensors")  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "transcoders": ["layer_0_width_24/params.safetensors"]}))  # fmt: skip
    got = load_transcoders(tmp_path)[0]
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    # the same weights (a copy) through the same kernels on the same shapes: exact
    assert got.architecture == "jumprelu" and torch.equal(got.reconstruct(x), tc.reconstruct(x))


# ------------------------------------------------------------------------------------------------ the site
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_splicing_keeps_the_logits_on_every_family(tmp_path, family, skip):
    model = make_tiny(family)
    site = write_set(tmp_path / "tc", model, architecture="jumprelu", skip=skip)
    tset = load_transcoders(tmp_path / "tc")
    assert site_layers(model, site) == [0, 2] and site_width(model, site) == 64 + model.d_model
    batch = model.tokenize(["the keys to the cabinet", "the dog near the table is"])
    want = model.logits(batch)
    io, handle = mlp_io(model, 2)
    try:
        acts = capture(model, batch, sites=[site], layers=[0, 2])
    finally:
        handle.remove()
    torch.testing.assert_close(acts.logits, want, atol=1e-5, rtol=0)
    (u,), (y,) = io["u"], io["y"]  # registered first, so it saw the MLP's own output
    z, tc = acts[(site, 2)], tset[2]
    latents = tc.encode(u)
    torch.testing.assert_close(z[..., :64], latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(z[..., 64:], y - tc.decode(latents, u), atol=1e-6, rtol=0)
    assert (latents != 0).any() and z[..., 64:].abs().max() > 1e-2  # a random transcoder leaves a real error
    torch.testing.assert_close(model.logits(batch), want, rtol=0, atol=0)  # the hooks are gone: exact


def test_splicing_a_bfloat16_model_keeps_its_logits_bit_for_bit(tmp_path):
    model = make_tiny("gemma3")
    model.hf.to(torch.bfloat16)
    site = write_set(tmp_path / "tc", model, skip=True)
    batch = model.tokenize(["the keys to the cabinet", "the dog near the table is"])
    acts = capture(model, batch, sites=[site], layers=[0, 2])
    assert acts[(site, 0)].dtype == torch.bfloat16
    # exact by construction: an unchanged splice returns y + (s - s) = y, its own output (sites._hook_transcoder)
    assert torch.equal(acts.logits, model.logits(batch))


def test_a_hook_that_edits_z_changes_the_mlp_output(tmp_path, model):
    """What fn returns is fed on: zeroing one position's error term leaves decode(latents) there."""
    site = write_set(tmp_path / "tc", model, layers=(1,))
    tc = load_transcoders(tmp_path / "tc")[1]
    batch = model.tokenize("the keys to the cabinet")

    def drop_error(z):
        z = z.clone()
        z[:, -1, 64:] = 0
        return z

    # hooks run in the order they are registered: this one sees the MLP's own output
    io, rec = mlp_io(model, 1)
    handle = hook_site(model, site, 1, drop_error)
    seen: list[torch.Tensor] = []
    out = model.layer_module(1, model.adapter.mlp).register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            model.forward(batch)
    finally:
        for h in (rec, handle, out):
            h.remove()
    # `out` was registered after the site's hook, so it saw the edited output
    u, y = io["u"][0], io["y"][0]
    torch.testing.assert_close(seen[0][:, -1], tc.decode(tc.encode(u))[:, -1], atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[0][:, :-1], y[:, :-1], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ attribution
def _grad_and_input(model, batch, metric, layer: int, relp: bool):
    """``g = dm/d(mlp_out)`` and the MLP input ``u`` at ``layer``, ``[B, T, d]`` each, from one run."""
    io, handle = mlp_io(model, layer)
    try:
        run = run_sites(
            model, batch, metric, site="mlp_out", layers=[layer], rules=RelPRules() if relp else None
        )
        (g,) = torch.autograd.grad(run.metric.sum(), [run.acts[layer]])
    finally:
        handle.remove()
    mask = batch.attention_mask[..., None].to(g.dtype)
    return g * mask, io["u"][0] * mask


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("method", ["atp", "relp"])
def test_latents_and_errors_add_up_to_the_raw_mlp_output_less_the_bias(tmp_path, model, method, paired, skip):
    site = write_set(tmp_path / "tc", model, skip=skip)
    tset = load_transcoders(tmp_path / "tc")
    inputs = dict(pairs=PAIRS) if paired else dict(prompts=PROMPTS, answers=ANSWERS, baseline="zero")
    raw = attribute(model, **inputs, method=method, site="mlp_out", layers=[0, 2])
    got = attribute(model, **inputs, method=method, site=site)
    torch.testing.assert_close(got.metric_clean, raw.metric_clean)
    if paired:
        clean, patch = tokenize_pairs(model, [p.clean_prefix for p in PAIRS], [p.patch_prefix for p in PAIRS])
        ids = lambda key: [single_token_id(model, getattr(p, key)) for p in PAIRS]  # noqa: E731
        metric = make_metric("logit-diff", answer=ids("clean_answer"), contrast=ids("patch_answer"))
    else:
        clean, patch = model.tokenize(PROMPTS), None
        metric = make_metric("logit", answer=[single_token_id(model, a) for a in ANSWERS])
    for li, layer in enumerate([0, 2]):
        tc = tset[layer]
        g, u = _grad_and_input(model, clean, metric, layer, relp=method == "relp")
        if paired:
            _, u_patch = _grad_and_input(model, patch, metric, layer, relp=False)
            offset = ((u_patch - u) @ tc.W_skip * g).sum((1, 2)) if skip else torch.zeros(len(PAIRS))
        else:
            offset = (tc.b_dec * g).sum((1, 2)) + ((u @ tc.W_skip * g).sum((1, 2)) if skip else 0)
        want = raw.scores_sum[:, li].sum(-1) - offset
        total = got.scores_sum[:, li].sum(-1)
        torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert got.scores_sum[:, li, :64].abs().sum() > 0 and got.scores_sum[:, li, 64:].abs().sum() > 0
        if not paired:  # the bias term is not negligible
            assert float(offset.abs().max()) > 1e-2 * float(want.abs().max())


def test_relp_conservation_counts_the_error_nodes(tmp_path, model):
    """RelP, zero baseline, a bias-free model: the residual stream after layer L holds the whole logit (a cut of
    the network). It is what bypasses the MLP (resid - mlp_out) plus the MLP output, and the MLP output is the
    latents plus the error nodes plus the decoder bias: with the error nodes counted the logit is conserved,
    without them it is not. Latents and errors alone do not sum to the logit (the MLP output is no cut). And the
    splice adds no relevance: with it in place, the scores at layer 0's residual still sum to the logit."""
    layer = 1
    site = write_set(tmp_path / "tc", model, layers=(layer,))
    tc = load_transcoders(tmp_path / "tc")[layer]
    prompt, answer = PROMPTS[0], ANSWERS[0]
    logit = float(model.logits(model.tokenize(prompt))[0, -1, single_token_id(model, answer)])

    def run(s: str):
        return attribute(model, prompt=prompt, answer=answer, method="relp", site=s, layers=[layer])

    resid, mlp, nodes = run("resid"), run("mlp_out"), run(site)
    assert float(resid.scores.sum()) == pytest.approx(logit, rel=1e-5)
    g, _ = _grad_and_input(
        model,
        model.tokenize(prompt),
        make_metric("logit", answer=[single_token_id(model, answer)]),
        layer,
        relp=True,
    )
    bias = float((tc.b_dec * g).sum())
    bypass = float(resid.scores.sum() - mlp.scores.sum())
    latents, errors = float(nodes.scores[..., :64].sum()), float(nodes.scores[..., 64:].sum())
    assert latents + errors + bias + bypass == pytest.approx(logit, rel=1e-4)
    assert abs(errors) > 1e-2 * abs(logit)  # without the error nodes the identity fails
    assert latents + errors != pytest.approx(logit, rel=1e-2)
    handle = hook_site(model, site, layer, lambda z: None)
    try:
        spliced = attribute(model, prompt=prompt, answer=answer, method="relp", site="resid", layers=[0])
    finally:
        handle.remove()
    assert float(spliced.scores.sum()) == pytest.approx(logit, rel=1e-5)


def test_exact_patching_of_one_latent_is_the_hand_edited_forward(tmp_path, model):
    layer = 1
    site = write_set(tmp_path / "tc", model, layers=(layer,), architecture="relu")
    tc = load_transcoders(tmp_path / "tc")[layer]
    pair = PAIRS[0]
    result = attribute(model, pairs=[pair], method="exact", site=site)
    scores = result.scores[0, 0, :, :64]  # [T, latents]
    t, j = divmod(int(scores.abs().argmax()), 64)
    assert abs(float(scores[t, j])) > 1e-4

    answer, contrast = single_token_id(model, pair.clean_answer), single_token_id(model, pair.patch_answer)
    mlp = model.layer_module(layer, model.adapter.mlp)
    seen: dict[str, torch.Tensor] = {}

    def record(_m, args, out):
        seen["f"] = tc.encode(args[0])

    def edit(_m, args, out):  # the splice written out by hand, with latent j at position t patched
        u = args[0]
        f = tc.encode(u)
        error = out - tc.decode(f, u)
        f = f.clone()
        f[:, t, j] = seen["f"][:, t, j]
        return tc.decode(f, u) + error

    def metric(prompt: str, hook) -> float:
        handle = mlp.register_forward_hook(hook) if hook else None
        try:
            logits = model.logits(model.tokenize(prompt))[0, -1]
        finally:
            if handle:
                handle.remove()
        return float(logits[answer] - logits[contrast])

    metric(pair.patch_prefix, record)
    by_hand = metric(pair.clean_prefix, edit) - metric(pair.clean_prefix, None)
    assert float(scores[t, j]) == pytest.approx(by_hand, rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------------------ errors
def _one_line(excinfo) -> None:
    assert "\n" not in str(excinfo.value)


def test_site_errors_are_one_line(tmp_path, model):
    site = write_set(tmp_path / "tc", model)
    with pytest.raises(NeurontraceError, match="no transcoder for layer 1; it covers layers \\[0, 2\\]") as e:
        attribute(model, pairs=PAIRS, site=site, layers=[0, 1])
    _one_line(e)
    save_transcoders({0: random_transcoder(8, 16, 0)}, tmp_path / "small", model_name="m")
    with pytest.raises(
        NeurontraceError, match="read 8 and write 8 values, but the model's MLP reads and writes 32"
    ) as e:
        site_width(model, f"transcoder:{tmp_path / 'small'}")
    _one_line(e)
    save_transcoders({5: random_transcoder(32, 16, 5)}, tmp_path / "deep", model_name="m")
    with pytest.raises(NeurontraceError, match=r"layer 5; the model has layers 0\.\.2"):
        site_width(model, f"transcoder:{tmp_path / 'deep'}")
    with pytest.raises(NeurontraceError, match="no such transcoder folder") as e:
        check_site(f"transcoder:{tmp_path / 'nothing'}")
    _one_line(e)
    gemma = make_tiny("gemma2")
    folder = tmp_path / "g"
    save_transcoders({0: random_transcoder(gemma.d_model, 16, 0)}, folder, model_name="gemma")
    assert site_width(gemma, f"transcoder:{folder}") == 16 + gemma.d_model  # mlp.hook_out fits Gemma
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "feature_output_hook": "hook_mlp_out"}))
    with pytest.raises(NeurontraceError, match="post_feedforward_layernorm") as e:
        site_width(gemma, f"transcoder:{folder}")
    _one_line(e)
    assert site_width(make_tiny("llama"), f"transcoder:{folder}") == 16 + 32  # the same tensor on Llama


def test_folder_errors_are_one_line(tmp_path):
    from safetensors.torch import save_file

    cases = []
    with pytest.raises(NeurontraceError, match=r"config\.yaml is missing") as e:
        load_transcoders(tmp_path)
    cases.append(e)
    folder = save_transcoders({0: random_transcoder(8, 16, 0, "relu")}, tmp_path / "tc", model_name="m")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    for hook, what in [("ln2.hook_normalized", "before its weight"), ("hook_resid_mid", "before the MLP's norm"),
                       ("blocks.0.hook_resid_post", "not one neurontrace splices")]:  # fmt: skip
        (folder / "config.yaml").write_text(yaml.safe_dump({**config, "feature_input_hook": hook}))
        with pytest.raises(NeurontraceError, match=f"feature_input_hook '{hook}' is .*{what}") as e:
            load_transcoders(folder)
        cases.append(e)
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "feature_output_hook": "mlp.hook_post"}))
    with pytest.raises(NeurontraceError, match=r"feature_output_hook 'mlp\.hook_post'") as e:
        load_transcoders(folder)
    cases.append(e)
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "model_kind": "cross_layer_transcoder"}))
    with pytest.raises(NeurontraceError, match="cross-layer transcoder") as e:
        load_transcoders(folder)
    cases.append(e)
    (folder / "config.yaml").write_text("model_kind: [unclosed")
    with pytest.raises(NeurontraceError, match="is not YAML") as e:
        load_transcoders(folder)
    cases.append(e)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    tc = random_transcoder(8, 16, 0, "relu")
    save_file(
        {"W_enc": tc.W_enc.T.contiguous(), "b_enc": tc.b_enc, "b_dec": tc.b_dec},
        folder / "layer_0.safetensors",
    )
    with pytest.raises(NeurontraceError, match="lacks the tensors W_dec") as e:
        load_transcoders(folder)
    cases.append(e)
    save_file({"W_enc": tc.W_enc.contiguous(), "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec},
              folder / "layer_0.safetensors")  # fmt: skip
    with pytest.raises(
        NeurontraceError, match=r"layer_0.safetensors: .*W_enc \[d_transcoder, d_model\]"
    ) as e:
        load_transcoders(folder)  # neurontrace's orientation is not circuit-tracer's
    cases.append(e)
    (folder / "layer_0.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NeurontraceError, match="not a readable safetensors file") as e:
        load_transcoders(folder)
    cases.append(e)
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "transcoders": ["layer_0/params.npz"]}))
    with pytest.raises(NeurontraceError, match="safetensors only") as e:
        load_transcoders(folder)
    cases.append(e)
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "activation_function": "jumprelu"}))
    save_transcoders({0: tc}, folder, model_name="m")
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "activation_function": "jumprelu"}))
    with pytest.raises(NeurontraceError, match=r"lacks activation_function\.threshold") as e:
        load_transcoders(folder)
    cases.append(e)
    for case in cases:
        _one_line(case)


def test_constructor_and_save_errors_are_one_line(tmp_path):
    z = torch.zeros
    cases = [
        (lambda: Transcoder(z(4, 8), z(7), z(8, 4), z(4), 0, "relu"), "b_enc has shape \\(7,\\), expected \\(8,\\)"),
        (lambda: Transcoder(z(4, 8), z(8), z(8, 4), z(4), 0), "needs k"),
        (lambda: Transcoder(z(4, 8), z(8), z(8, 4), z(4), 0, "jumprelu"), "needs its threshold"),
        (lambda: Transcoder(z(4, 8), z(8), z(8, 4), z(4), 0, "relu", threshold=z(8)), "for JumpReLU"),
        (lambda: Transcoder(z(4, 8), z(8), z(8, 4), z(4), 0, "relu", W_skip=z(4, 5)), "W_skip has shape"),
        (lambda: Transcoder(z(4, 8), z(8), z(8, 4), z(4), -1, "relu"), "layer must be"),
        (lambda: Transcoder(z(4, 8), z(8), z(8, 4), z(4), 0, "standard"), "not supported"),
        (lambda: save_transcoders({1: random_transcoder(8, 16, 0)}, tmp_path / "x", model_name="m"),
         "given for layer 1 says it is for layer 0"),
        (lambda: save_transcoders({0: random_transcoder(8, 16, 0, "relu"), 1: random_transcoder(8, 16, 1)},
                                  tmp_path / "x", model_name="m"), "mix activation functions"),
        (lambda: save_transcoders({0: random_transcoder(8, 16, 0), 1: random_transcoder(8, 12, 1)},
                                  tmp_path / "x", model_name="m"), "differ in size"),
        (lambda: save_transcoders({}, tmp_path / "x", model_name="m"), "at least one"),
        (lambda: TranscoderSet({0: random_transcoder(8, 16, 0)}, input_hook="ln2.hook_normalized"), "before its weight"),
    ]  # fmt: skip
    for make, message in cases:
        with pytest.raises(NeurontraceError, match=message) as e:
            make()
        _one_line(e)


# ------------------------------------------------------------------------------------------------ the hub
def test_hub_specs():
    assert parse_hub_spec("hf:owner/repo") == ("owner/repo", None, None)
    assert parse_hub_spec("hf:owner/repo/a/b@v1") == ("owner/repo", "a/b", "v1")
    assert parse_hub_spec("hf://owner/repo/sub/") == ("owner/repo", "sub", None)
    for bad in ("hf:justone", "hf:owner/repo/../up"):
        with pytest.raises(NeurontraceError, match="not a hub dictionary"):
            parse_hub_spec(bad)
    assert str(resolve_dictionary("some/local/folder")) == "some/local/folder"  # a local path is unchanged


def test_offline_hub_specs_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "neurontrace-nobody/no-such-transcoders"
    for spec in (f"hf:{repo}/layer_set", f"transcoder:hf:{repo}", f"sae:hf:{repo}/blocks.0.hook_resid_post"):
        with pytest.raises(NeurontraceError, match=f"{repo}.*hub is unreachable") as e:
            resolve_dictionary(spec) if spec.startswith("hf:") else check_site(spec)
        _one_line(e)
    folder = save_transcoders({0: random_transcoder(8, 16, 0, "relu")}, tmp_path / "tc", model_name="m")
    (folder / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((folder / "config.yaml").read_text()),
                                                        "transcoders": [f"hf://{repo}/layer_0.safetensors"]}))  # fmt: skip
    with pytest.raises(NeurontraceError, match=f"{repo}.*hub is unreachable"):
        load_transcoders(folder)


def test_a_hub_spec_downloads_only_safetensors_json_and_yaml(monkeypatch, tmp_path):
    import huggingface_hub

    import neurontrace.models.loading as loading

    (tmp_path / "snap" / "sub").mkdir(parents=True)
    save_transcoders({0: random_transcoder(8, 16, 0, "relu")}, tmp_path / "snap" / "sub", model_name="m")
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(loading, "hub_reachable", lambda: True)
    assert resolve_dictionary("hf:owner/repo/sub@main") == tmp_path / "snap" / "sub"
    assert load_transcoders("hf:owner/repo/sub").layers == [0]
    assert site_layers(make_tiny("llama"), "transcoder:hf:owner/repo/sub") == [0]
    assert len(calls) == 2  # a spec is looked up once per process
    (repo, kwargs), _ = calls
    assert repo == "owner/repo" and kwargs["revision"] == "main" and not kwargs["local_files_only"]
    assert kwargs["allow_patterns"] == ["sub/*.safetensors", "sub/*.json", "sub/*.yaml", "sub/*.yml"]
    with pytest.raises(NeurontraceError, match="has no folder nope"):
        resolve_dictionary("hf:owner/repo/nope")
