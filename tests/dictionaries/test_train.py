"""Training dictionaries (``neurontrace train-sae``) on tiny models: gradients against autograd, held-out metrics
recomputed by hand, the output as a basis, kill-and-resume to the same weights, settings checks, corpora, the CLI.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, make_tiny, save_tiny_folder

from neurontrace.cli import main
from neurontrace.dictionaries.basis import load_basis
from neurontrace.dictionaries.corpus import SampleCorpus, TextCorpus, open_corpus
from neurontrace.dictionaries.train import (
    CHECKPOINT,
    SAMPLE_CACHE,
    TRAINING_JSON,
    TrainConfig,
    _Bags,
    _capture,
    _Stack,
    train_dictionaries,
)
from neurontrace.errors import DatasetError, NeurontraceError
from neurontrace.sites import capture, hook_site

CONTEXT = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is much faster than two that wait for each other on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A text corpus of random sentences over the tiny vocabulary, documents separated by blank lines."""
    g = torch.Generator().manual_seed(1)
    docs = []
    for _ in range(120):
        n = int(torch.randint(5, 30, (1,), generator=g))
        docs.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def config(**kw) -> TrainConfig:
    base = dict(layers=[0, 2], d_sae=64, k=6, tokens=6000, batch_size=128, context=CONTEXT, held_out=300,
                buffer_tokens=1024)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def held_blocks(corpus, settings) -> torch.Tensor:
    n = math.ceil(settings["held_out"] / (settings["context"] - 1))
    return torch.stack(list(corpus.blocks())[:n])


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("aten", [True, False], ids=["aten-kernels", "autograd"])
def test_the_training_step_gradients_are_autograd_s_on_the_topk_and_auxk_loss(monkeypatch, aten):
    monkeypatch.setattr(_Bags, "aten", aten)
    torch.manual_seed(0)
    L, S, d, n, k = 2, 40, 12, 32, 4
    s = {"layers": [0, 1], "d_sae": S, "d_in": d, "k": k, "lr": 1e-3, "precision": "float32", "dead_tokens": 50,
         "aux_k": 6, "aux_coeff": 1 / 32}  # fmt: skip
    stack = _Stack(s, torch.device("cpu"))
    x, y = torch.randn(L, 256, d), torch.randn(L, 256, d)
    stack.initialise(x, y, torch.Generator().manual_seed(0))
    with torch.no_grad():
        stack.b_enc.add_(0.1 * torch.randn(L, S))
    dead = torch.rand(L, S) < 0.5
    stack.since_fired.copy_(torch.where(dead, 100, 0))
    xb, yb = x[:, :n], y[:, :n]
    (g_enc, g_b_enc, g_dec, g_b_dec), fvu = stack.gradients(xb, yb)

    W_encT, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in stack.params)
    pre = xb @ W_encT.transpose(1, 2) + b_enc[:, None]
    vals, idx = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    rec = z @ W_dec + b_dec[:, None]
    main_loss = ((rec - yb).pow(2).sum(-1).mean(-1) / stack.var_out).sum()
    m = math.ceil(n / 4)
    masked = pre[:, :m].masked_fill(~dead[:, None], float("-inf"))
    vals_a, idx_a = masked.topk(6, dim=-1)
    z_a = torch.zeros_like(masked).scatter(-1, idx_a, vals_a.relu())
    target = (yb - rec)[:, :m].detach()
    var = (target - target.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)
    aux = ((z_a @ W_dec - target).pow(2).sum(-1).mean(-1) / var).sum() / 32
    (main_loss + aux).backward()
    for mine, ref in (
        (g_enc, W_encT.grad),
        (g_b_enc, b_enc.grad),
        (g_dec, W_dec.grad),
        (g_b_dec, b_dec.grad),
    ):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fvu, (rec - yb).pow(2).sum(-1).mean(-1).detach() / stack.var_out)
    assert (
        float(aux.detach()) > 0 and g_dec[dead].abs().sum() > 0
    )  # dead latents do get a gradient, through AuxK
    fired = torch.zeros(L, S, dtype=torch.bool).scatter_(1, idx.reshape(L, -1), True)
    assert torch.equal(stack.since_fired == 0, fired) and int(stack.since_fired.max()) == 100 + n


def test_the_capture_that_stops_early_sees_the_site_s_activations(model):
    ids = torch.randint(4, 30, (3, CONTEXT))
    for site in ("mlp_out", "resid", "neurons"):
        x, y, logits = _capture(model, ids, [0, 1], "sae", site, torch.device("cpu"))
        assert logits is None and y is x
        batch = model.tokenize(["the"])
        batch.input_ids, batch.attention_mask = ids, torch.ones_like(ids)
        want = capture(model, batch, sites=site, layers=[0, 1])
        torch.testing.assert_close(x, torch.stack([want.get(layer, site)[:, 1:] for layer in (0, 1)]))
    x, y, _ = _capture(model, ids, [1], "transcoder", "mlp", torch.device("cpu"))
    mlp = model.layer_module(1, model.adapter.mlp)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x[0]), y[0], atol=1e-5, rtol=1e-5)  # MLP input -> MLP output


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(model, tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("train") / "sae"
    rounds = []
    result = train_dictionaries(model, out, config(), corpus=str(text_file), on_round=rounds.append)
    return out, result, rounds


@torch.no_grad()
def test_training_lowers_the_loss_and_explains_held_out_variance(model, trained, text_file):
    out, result, rounds = trained
    assert result.tokens >= 6000 and rounds[-1]["tokens"] == result.tokens and not (out / CHECKPOINT).exists()
    assert rounds[-1]["fvu"] < 0.7 * rounds[0]["fvu"]  # the training loss fell
    basis = load_basis(str(out))
    assert sorted(basis.saes) == [0, 2] and basis.site == "mlp_out" and basis.d_sae == 64
    corpus = TextCorpus(model, text_file, CONTEXT)
    held = held_blocks(corpus, result.settings)
    clean = model.hf(input_ids=held).logits
    targets = held[:, 2:].flatten()
    clean_loss = F.cross_entropy(clean[:, 1:-1].flatten(0, 1), targets)
    assert result.clean_loss == pytest.approx(float(clean_loss), abs=1e-4)
    acts = capture(model, model.tokenize(["the"]), sites="mlp_out", layers=[0])  # for the batch class only
    for layer, sae in basis.saes.items():
        assert (sae.architecture, sae.k, sae.layer) == ("topk", 6, layer)
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)  # unit-norm decoder rows
        batch = acts.batch
        batch.input_ids, batch.attention_mask = held, torch.ones_like(held)
        x = (
            capture(model, batch, sites="mlp_out", layers=[layer])
            .get(layer, "mlp_out")[:, 1:]
            .reshape(-1, 32)
        )
        f = sae.encode(x)
        explained = 1 - (sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        m = result.metrics[layer]
        assert m.variance_explained == pytest.approx(float(explained), abs=1e-4)
        assert m.variance_explained > 0.6  # held-out, never trained on
        assert m.l0 == pytest.approx(float((f > 0).sum(-1).float().mean()), abs=1e-6) and 5 <= m.l0 <= 6

        def spliced(t, sae=sae):
            t = t.clone()
            t[:, 1:] = sae.decode(sae.encode(t[:, 1:]))
            return t

        handle = hook_site(model, "mlp_out", layer, spliced)
        try:
            loss = F.cross_entropy(model.hf(input_ids=held).logits[:, 1:-1].flatten(0, 1), targets)
        finally:
            handle.remove()
        assert m.loss_spliced == pytest.approx(float(loss), abs=1e-4)
        assert m.loss_increase == pytest.approx(float(loss - clean_loss), abs=1e-4)
        assert 0 <= m.dead <= 64 and m.dead_fraction == m.dead / 64
        cfg = json.loads((out / f"blocks.{layer}.hook_mlp_out" / "cfg.json").read_text())
        assert cfg["metadata"]["metrics"]["variance_explained"] == m.variance_explained
        assert cfg["metadata"]["training"]["tokens"] == 6000 and cfg["metadata"]["model_name"] == "tiny-llama"
    info = json.loads((out / TRAINING_JSON).read_text())
    assert (
        info["done"]
        and info["settings"] == result.settings
        and info["metrics"]["2"]["l0"] == result.metrics[2].l0
    )


@pytest.mark.parametrize(("kind", "site"), [("sae", "resid"), ("transcoder", "mlp_out")])
def test_saved_decoder_rows_have_unit_norm_after_large_steps(model, tmp_path, text_file, kind, site):
    """A few Adam steps at a large learning rate move decoder rows far off the unit sphere unless each step
    renormalises them; the saved weights (scales folded into the latents, not the rows) must have unit rows.
    Tolerance: a row divided by its float32 norm has norm 1 up to ~(d/2 + 2) float32 ulps (d = 32: ~1e-6)."""
    from neurontrace.dictionaries.transcoder import load_transcoders

    cfg = config(
        kind=kind, site=site, layers=[1], d_sae=32, tokens=1536, lr=0.05, held_out=30, buffer_tokens=512
    )
    result = train_dictionaries(model, tmp_path, cfg, corpus=str(text_file), checkpoint_every_s=1e9)
    assert result.info["steps"] >= 10
    saved = load_basis(str(tmp_path)).saes if kind == "sae" else load_transcoders(tmp_path)
    W_dec = saved[1].W_dec
    assert W_dec.shape == (32, model.d_model)
    torch.testing.assert_close(W_dec.norm(dim=-1), torch.ones(32), atol=1e-5, rtol=0)


def test_the_trained_folder_is_a_site_for_attribution(model, trained):
    from neurontrace.attribution.api import attribute
    from neurontrace.tasks.pairs import Pair

    out = trained[0]
    pairs = [Pair("the keys to the cabinet", "the key to the cabinet", " are", " is")]
    raw = attribute(model, pairs=pairs, method="atp", site="mlp_out", layers=[0, 2])
    got = attribute(model, pairs=pairs, method="atp", site=f"sae:{out}")
    torch.testing.assert_close(got.metric_clean, raw.metric_clean)  # the splice keeps the model's output
    assert got.mean_scores.shape[-1] == 64 + 32 and got.layers == [0, 2]
    # per layer and position, latents plus error components hold the raw site's AtP total
    torch.testing.assert_close(got.mean_scores.sum(-1), raw.mean_scores.sum(-1), atol=1e-5, rtol=1e-4)
    assert got.mean_scores[..., :64].abs().sum() > 0


def test_a_killed_run_resumes_to_the_same_weights(model, tmp_path, text_file):
    cfg = config(layers=[1], tokens=5000, dead_tokens=600)  # dead latents: AuxK and its counters in play
    told = []
    whole = train_dictionaries(model, tmp_path / "whole", cfg, corpus=str(text_file), checkpoint_every_s=1e9,
                               log=told.append)  # fmt: skip
    assert any("training tokens: 2." in line and "passes over it" in line for line in told)  # read ~2.4 times

    class Killed(Exception):
        pass

    def kill(info):
        if info["rounds"] == 3:
            assert info["checkpointed"]
            raise Killed

    with pytest.raises(Killed):
        train_dictionaries(
            model, tmp_path / "cut", cfg, corpus=str(text_file), checkpoint_every_s=0, on_round=kill
        )
    assert (tmp_path / "cut" / CHECKPOINT).is_file() and not (tmp_path / "cut" / TRAINING_JSON).exists()
    said = []
    again = train_dictionaries(model, tmp_path / "cut", cfg, corpus=str(text_file), log=said.append)
    assert again.resumed_from > 0 and any(line.startswith("resuming") for line in said)
    a, b = load_basis(str(tmp_path / "whole")).saes[1], load_basis(str(tmp_path / "cut")).saes[1]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=0)
    assert again.metrics[1] == whole.metrics[1] and again.tokens == whole.tokens
    assert not (tmp_path / "cut" / CHECKPOINT).exists()


def test_reruns_say_done_already_and_other_settings_are_refused(model, tmp_path, text_file):
    cfg = config(layers=[0], tokens=800)
    first = train_dictionaries(model, tmp_path, cfg, corpus=str(text_file))
    said = []
    again = train_dictionaries(model, tmp_path, cfg, corpus=str(text_file), log=said.append)
    assert again.already_done and said == [f"done already: {tmp_path} holds this run, finished"]
    assert again.metrics == first.metrics
    with pytest.raises(NeurontraceError, match=r"other settings \(d_sae: 64 there, 32 now.*--fresh") as err:
        train_dictionaries(model, tmp_path, config(layers=[0], tokens=800, d_sae=32), corpus=str(text_file))
    assert "\n" not in str(err.value)
    fresh = train_dictionaries(model, tmp_path, config(layers=[0], tokens=800, d_sae=32), corpus=str(text_file),
                               fresh=True)  # fmt: skip
    assert not fresh.already_done and load_basis(str(tmp_path)).d_sae == 32

    def stop(_info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dictionaries(
            model, tmp_path / "cut", cfg, corpus=str(text_file), checkpoint_every_s=0, on_round=stop
        )
    with pytest.raises(NeurontraceError, match="checkpoint of a run with other settings"):
        train_dictionaries(
            model, tmp_path / "cut", config(layers=[0], tokens=800, k=3), corpus=str(text_file)
        )


@pytest.mark.parametrize(
    "change, message",
    [(dict(layers=[3]), "layer 3 does not exist"), (dict(k=65), "cannot exceed"), (dict(site="attn"), "cannot train"),
     (dict(kind="clt"), "unknown dictionary kind"), (dict(context=2), "at least 3"), (dict(tokens=0), "tokens must")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(model, tmp_path, text_file, change, message):
    with pytest.raises(NeurontraceError, match=message):
        train_dictionaries(model, tmp_path, config(**change), corpus=str(text_file))


def test_transcoders_predict_the_mlp_output(model, tmp_path, text_file):
    from neurontrace.attribution.api import attribute
    from neurontrace.dictionaries.transcoder import load_transcoders
    from neurontrace.tasks.pairs import Pair

    result = train_dictionaries(
        model, tmp_path, config(kind="transcoder", layers=[1], tokens=15000), corpus=str(text_file)
    )
    tset = load_transcoders(tmp_path)
    tc = tset[1]
    assert tset.layers == [1] and (tc.architecture, tc.k, tc.d_sae) == ("topk", 6, 64)
    held = held_blocks(TextCorpus(model, text_file, CONTEXT), result.settings)
    x, y, _ = _capture(model, held, [1], "transcoder", "mlp", torch.device("cpu"))
    x, y = x[0].reshape(-1, 32), y[0].reshape(-1, 32)
    explained = 1 - (tc.reconstruct(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert result.metrics[1].variance_explained == pytest.approx(float(explained), abs=1e-4)
    assert result.metrics[1].variance_explained > 0.5
    pairs = [Pair("the keys to the cabinet", "the key to the cabinet", " are", " is")]
    got = attribute(model, pairs=pairs, method="atp", site=f"transcoder:{tmp_path}")
    raw = attribute(model, pairs=pairs, method="atp", site="mlp_out", layers=[1])
    torch.testing.assert_close(got.metric_clean, raw.metric_clean)


# ------------------------------------------------------------------------------------------------- corpora
def test_text_files_folders_and_jsonl_become_bos_blocks(model, tmp_path):
    tok = model.tokenizer
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("the keys are\n\n  \nthe dog runs near the table\n")
    (tmp_path / "b" / "c.jsonl").write_text('{"text": "one two three"}\n\n{"text": "four five six seven"}\n')
    (tmp_path / "b" / "skip.csv").write_text("not read")
    stream = []
    for doc in ("the keys are", "the dog runs near the table", "one two three", "four five six seven"):
        stream += [*tok.encode(doc, add_special_tokens=False), tok.eos_token_id]
    blocks = [b.tolist() for b in TextCorpus(model, tmp_path, context=5).blocks()]
    assert blocks == [[tok.bos_token_id, *stream[i : i + 4]] for i in range(0, len(stream) - 3, 4)]
    assert [b.tolist() for b in TextCorpus(model, tmp_path, context=5).blocks(skip=2)] == blocks[2:]
    one = [b.tolist() for b in TextCorpus(model, tmp_path / "a.txt", context=5).blocks()]
    assert one == blocks[:2]  # 11 tokens: two whole blocks, the rest dropped
    jsonl = [b.tolist() for b in open_corpus(str(tmp_path / "b" / "c.jsonl"), model, context=5).blocks()]
    assert jsonl[0] == [tok.bos_token_id, *stream[11:15]]


def test_bad_corpora_are_one_line_errors(model, tmp_path):
    with pytest.raises(NeurontraceError, match="no such corpus"):
        open_corpus(str(tmp_path / "missing.txt"), model)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(NeurontraceError, match="is empty: it holds 0 tokens"):
        list(open_corpus(str(tmp_path / "empty.txt"), model).blocks())
    (tmp_path / "short.md").write_text("the keys")
    with pytest.raises(NeurontraceError, match="holds 2 tokens, fewer than one block of 128"):
        list(open_corpus(str(tmp_path / "short.md"), model).blocks())
    (tmp_path / "bad.jsonl").write_text('{"text": "the"}\n{"txt": "a"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2 has no string field 'text'"):
        list(open_corpus(str(tmp_path / "bad.jsonl"), model).blocks())
    (tmp_path / "dir").mkdir()
    with pytest.raises(NeurontraceError, match=r"has no \.txt, \.md, \.jsonl files"):
        open_corpus(str(tmp_path / "dir"), model)
    with pytest.raises(NeurontraceError, match="sample:N with N a number"):
        open_corpus("sample:lots", model)


def test_hub_corpora_without_the_datasets_package_say_what_to_do(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(NeurontraceError, match="needs the datasets package: pip install datasets"):
        open_corpus("hf:roneneldan/TinyStories", model)
    with pytest.raises(NeurontraceError, match="hf:NAME"):
        open_corpus("hf::x:y:z", model)


def test_sampled_corpora_are_seeded_start_with_bos_and_resume_from_their_cache(model, tmp_path, monkeypatch):
    cache = tmp_path / SAMPLE_CACHE
    corpus = open_corpus("sample:1000", model, context=CONTEXT, seed=3, cache=cache)
    tokens = corpus.tokens()
    assert tokens.shape == (63, CONTEXT) and corpus.n_blocks == 63  # ceil(1000 / 16)
    assert (tokens[:, 0] == model.tokenizer.bos_token_id).all() and (tokens[:, 1:] != 0).any()
    assert len(set(map(tuple, tokens.tolist()))) == 63  # sampled, not repeated
    again = SampleCorpus(model, 1000, CONTEXT, seed=3)
    assert torch.equal(again.tokens(), tokens)  # the same seed samples the same text
    assert not torch.equal(SampleCorpus(model, 1000, CONTEXT, seed=4).tokens(), tokens)

    def no_sampling(*_a):
        raise AssertionError("sampled again")

    monkeypatch.setattr(SampleCorpus, "_generate", no_sampling)
    cached = SampleCorpus(model, 1000, CONTEXT, seed=3, cache=cache)
    assert torch.equal(cached.tokens(), tokens) and torch.equal(
        torch.stack(list(cached.blocks(skip=60))), tokens[60:]
    )


# ------------------------------------------------------------------------------------------------------ CLI
def test_the_command_trains_resumes_and_reports(tmp_path, capsys):
    folder = save_tiny_folder(tmp_path / "model")
    out = tmp_path / "out"
    args = ["train-sae", "--model", folder, "--layers", "0,2", "--tokens", "1500", "--d-sae", "48", "--k", "4",
            "--batch-size", "128", "--context", str(CONTEXT), "--held-out", "200", "--corpus", "sample:2500",
            "--dtype", "float32", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training 2 SAEs on mlp_out: d_sae 48, k 4, 1,500 tokens" in printed and "var expl" in printed
    assert f"use it with --site sae:{out}" in printed
    info = json.loads((out / TRAINING_JSON).read_text())
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith("      ")}
    for layer in ("0", "2"):  # the printed table is training.json's metrics
        m = info["metrics"][layer]
        assert rows[layer][:2] == [f"{m['variance_explained']:.3f}", f"{m['l0']:.1f}"]
        assert rows[layer][-1] == f"{m['loss_increase']:+.4f}"
    assert sorted(load_basis(str(out)).saes) == [0, 2] and (out / SAMPLE_CACHE).is_file()
    assert main(args) == 0 and "done already" in capsys.readouterr().out
    assert main([*args[:-2], "--out", str(out), "--k", "5"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the model's loading lines
    assert (
        last.startswith("neurontrace: error: ")
        and "holds a finished run with other settings (k: 4 there, 5 now)" in last
    )
    for bad, says in ((["--layers", "2-1"], "runs backwards"), (["--layers", "7"], "layer 7 does not exist"),
                      (["--transcoder", "--site", "resid"], "drop --site"), (["--site", "attn"], "an SAE is trained on")):  # fmt: skip
        assert main([*args, *bad]) == 2
        assert says in capsys.readouterr().err


def test_a_second_run_reuses_another_run_s_samples(tmp_path, capsys, monkeypatch):
    folder = save_tiny_folder(tmp_path / "model")
    first, second = tmp_path / "saes", tmp_path / "transcoders"
    args = ["train-sae", "--model", folder, "--layers", "1", "--tokens", "600", "--d-sae", "32", "--k", "4",
            "--batch-size", "128", "--context", str(CONTEXT), "--held-out", "100", "--corpus", "sample:900",
            "--dtype", "float32"]  # fmt: skip
    assert main([*args, "--out", str(first)]) == 0
    samples = (first / SAMPLE_CACHE).read_bytes()

    def no_sampling(*_a):
        raise AssertionError("sampled again")

    monkeypatch.setattr(SampleCorpus, "_generate", no_sampling)
    cache = ["--corpus-cache", str(first / SAMPLE_CACHE)]
    assert main([*args, "--transcoder", "--out", str(second), *cache]) == 0
    assert not (second / SAMPLE_CACHE).exists() and (first / SAMPLE_CACHE).read_bytes() == samples
    monkeypatch.undo()
    other = tmp_path / "other"
    assert main([*args, "--seed", "1", "--out", str(other), *cache]) == 0  # another seed: sampled into OUT
    assert (other / SAMPLE_CACHE).is_file() and (first / SAMPLE_CACHE).read_bytes() == samples
    capsys.readouterr()
    assert (
        main([*args, "--out", str(tmp_path / "x"), "--corpus-cache", str(tmp_path / "none.safetensors")]) == 2
    )
    assert "no sampled corpus at" in capsys.readouterr().err


def test_the_command_s_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["train-sae", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--site", "--transcoder", "--layers", "--corpus", "--tokens", "--d-sae", "--k", "--lr",
                   "--batch-size", "--context", "--seed", "--out", "--fresh", "--held-out", "sample:N", "hf:NAME"):  # fmt: skip
        assert option in text
