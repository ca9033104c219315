"""Steering: identity edits change nothing, scale 0 is ablation, patch equals the other prompt's activations,
edits during generation land on the positions asked (and equal cache-free decoding), sweeps, CLI, bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import FAMILIES, make_tiny, save_tiny_folder

from neurontrace.cli import _add_model_args
from neurontrace.commands.steer import add_steer_parser, run_steer
from neurontrace.errors import NeurontraceError
from neurontrace.interventions import Edit, intervene
from neurontrace.neurons import parse_neurons
from neurontrace.sites import capture
from neurontrace.steering import greedy_generate, steer, steering_edits, sweep
from neurontrace.tokens import Batch

PROMPT = "the keys to the cabinet"
ANSWERS = [" are", " is", " the", " of"]


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def _all_logits(result) -> tuple[torch.Tensor, torch.Tensor]:
    """Full before/after logit vectors from a result run with top = vocabulary size, in token-id order."""
    before = sorted((t.token_id, t.logit) for t in result.top_before)
    after = sorted((t.token_id, t.logit) for t in result.top_after)
    return torch.tensor([v for _, v in before]), torch.tensor([v for _, v in after])


def _greedy_without_cache(model, prompt_ids: list[int], edits: list[Edit], n: int) -> list[int]:
    """Greedy decoding that re-runs the whole sequence at every step with ``edits`` (no key/value cache)."""
    seq, out = list(prompt_ids), []
    for _ in range(n):
        with intervene(model, edits):
            token = int(model.logits(Batch.from_ids([seq]))[0, -1].argmax())
        seq.append(token)
        out.append(token)
        if token == model.hf.generation_config.eos_token_id:
            break
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_scale_one_and_add_zero_change_nothing(family):
    model = make_tiny(family)
    for mode, value in (("scale", 1.0), ("add", 0.0)):
        result = steer(
            model,
            prompt=PROMPT,
            neurons=parse_neurons("L0/N3,L1/N5@-1,L2/N7@0"),
            mode=mode,
            value=value,
            answers=ANSWERS,
            top=model.vocab_size,
            generate=5,
        )
        before, after = _all_logits(result)
        assert torch.equal(before, after)  # the same forward, and x * 1.0, x + 0.0 are x: exact
        assert result.kl_divergence == 0.0
        assert all(c.prob_change == 0 and c.logit_change == 0 for c in result.answers)
        assert result.generated_ids_before == result.generated_ids_after


def test_scale_zero_is_zero_ablation(llama):
    neurons = parse_neurons("L0/N3,L1/N5@-1,L2/N7")
    scaled = steer(llama, prompt=PROMPT, neurons=neurons, mode="scale", value=0.0, top=llama.vocab_size)
    zeroed = steer(llama, prompt=PROMPT, neurons=neurons, mode="set", value=0.0, top=llama.vocab_size)
    _, a = _all_logits(scaled)
    _, b = _all_logits(zeroed)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # ... and equals a manual zeroing with intervene
    batch = llama.tokenize(PROMPT)
    edits = [
        Edit(layer=0, neurons=[3], op="zero"),
        Edit(layer=1, neurons=[5], positions=[-1], op="zero"),
        Edit(layer=2, neurons=[7], op="zero"),
    ]
    with intervene(llama, edits):
        manual = llama.logits(batch)[0, -1]
    torch.testing.assert_close(a, manual, rtol=0, atol=1e-6)
    assert scaled.kl_divergence > 0


def test_answer_changes_and_kl_are_consistent(llama):
    result = steer(
        llama, prompt=PROMPT, neurons=parse_neurons("L2/N7"), mode="add", value=5.0, answers=ANSWERS, top=3
    )
    assert len(result.top_before) == 3 and len(result.answers) == 4
    batch = llama.tokenize(PROMPT)
    with intervene(llama, Edit(layer=2, neurons=[7], op="add", value=5.0)):
        after = llama.logits(batch)[0, -1]
    before = llama.logits(batch)[0, -1]
    for c in result.answers:
        assert c.logit_after == pytest.approx(float(after[c.token_id]), abs=1e-5)
        assert c.prob_after == pytest.approx(float(after.softmax(-1)[c.token_id]), abs=1e-6)
        assert c.prob_change == pytest.approx(c.prob_after - c.prob_before)
    p, q = before.softmax(-1), after.softmax(-1)
    assert result.kl_divergence == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4)
    assert json.loads(result.to_json())["schema_version"] == 1


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_patch_equals_running_with_the_other_prompts_activations(family):
    model = make_tiny(family)
    other = "the key to the cabinets"
    result = steer(
        model,
        prompt=PROMPT,
        neurons=parse_neurons("L1/N3,L1/N5,L2/N7"),
        mode="patch",
        from_prompt=other,
        top=model.vocab_size,
    )
    src = capture(model, model.tokenize(other))
    edits = [
        Edit(layer=1, neurons=[3, 5], op="patch", value=src.get(1)),
        Edit(layer=2, neurons=[7], op="patch", value=src.get(2)),
    ]
    with intervene(model, edits):
        manual = model.logits(model.tokenize(PROMPT))[0, -1]
    _, after = _all_logits(result)
    torch.testing.assert_close(after, manual, rtol=0, atol=1e-6)
    assert result.kl_divergence > 0 and result.value is None


def test_pinned_patch_across_different_lengths(llama):
    other = "a dog runs near the tables of the state"  # 9 tokens, the prompt has 5
    result = steer(
        llama,
        prompt=PROMPT,
        neurons=parse_neurons("L1/N3@-1,L1/N5@1,L2/N7@-2"),
        mode="patch",
        from_prompt=other,
        top=llama.vocab_size,
    )
    src = capture(llama, llama.tokenize(other))
    edits = [  # source positions are relative to the source prompt: -1 -> 8, 1 -> 1, -2 -> 7
        Edit(layer=1, neurons=[3], positions=[4], op="set", value=float(src.get(1)[0, 8, 3])),
        Edit(layer=1, neurons=[5], positions=[1], op="set", value=float(src.get(1)[0, 1, 5])),
        Edit(layer=2, neurons=[7], positions=[3], op="set", value=float(src.get(2)[0, 7, 7])),
    ]
    with intervene(llama, edits):
        manual = llama.logits(llama.tokenize(PROMPT))[0, -1]
    torch.testing.assert_close(_all_logits(result)[1], manual, rtol=0, atol=1e-6)


class _Recorder:
    """Records the neuron-site input of one layer at every forward pass (after the edits)."""

    def __init__(self, model, layer: int) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = model.down_proj(layer).register_forward_hook(
            lambda _m, args, _out: self.calls.append(args[0][0].detach().clone())
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_generation_edits_land_on_the_positions_asked(family):
    model = make_tiny(family)
    batch = model.tokenize(PROMPT)
    length, n = batch.width, 6
    neurons = parse_neurons("L1/N4@0,L1/N6@-1,L1/N9")
    edits = steering_edits(model, neurons, prompt_length=length, mode="set", value=7.0)
    with _Recorder(model, 1) as rec:
        ids = greedy_generate(model, batch, max_new_tokens=n, edits=edits)[0]
    assert len(rec.calls) == len(ids)  # prefill + one step per further token (the last token is not fed)
    prefill, steps = rec.calls[0], rec.calls[1:]
    assert prefill.shape[0] == length and all(s.shape[0] == 1 for s in steps)
    assert prefill[0, 4] == 7 and (prefill[1:, 4] != 7).all()  # @0: the first prompt token only
    assert prefill[-1, 6] == 7 and (prefill[:-1, 6] != 7).all()  # @-1: the prompt's last token only
    assert (prefill[:, 9] == 7).all()  # unpinned: every prompt position...
    for s in steps:  # ... and every generated token, where the pinned edits do not apply
        assert s[0, 9] == 7 and s[0, 4] != 7 and s[0, 6] != 7


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_edits_equals_decoding_without_cache(family):
    model = make_tiny(family)
    batch = model.tokenize(PROMPT)
    for spec, value in (("L0/N3@0,L1/N5@0", 20.0), ("L1/N4@-1", 20.0), ("L0/N3,L2/N7", 5.0)):
        edits = steering_edits(model, parse_neurons(spec), prompt_length=batch.width, mode="add", value=value)
        cached = greedy_generate(model, batch, max_new_tokens=8, edits=edits)[0]
        assert cached == _greedy_without_cache(model, batch.ids(0), edits, 8), spec
    result = steer(
        model, prompt=PROMPT, neurons=parse_neurons("L0/N3@0,L1/N5@0"), mode="add", value=20.0, generate=8
    )
    edits = steering_edits(
        model, parse_neurons("L0/N3@0,L1/N5@0"), prompt_length=batch.width, mode="add", value=20.0
    )
    assert result.generated_ids_after == _greedy_without_cache(model, batch.ids(0), edits, 8)
    assert result.generated_ids_before == _greedy_without_cache(model, batch.ids(0), [], 8)
    assert result.generated_after == model.tokenizer.decode(
        result.generated_ids_after, skip_special_tokens=True
    )


def test_pinned_edit_changes_generation_in_this_model(llama):
    result = steer(
        llama, prompt=PROMPT, neurons=parse_neurons("L0/N3@0,L1/N5@0"), mode="add", value=20.0, generate=8
    )
    assert result.generated_ids_after != result.generated_ids_before


def test_patch_during_generation_patches_prompt_positions_only(llama):
    other = "the key to the cabinets"
    batch, source = llama.tokenize(PROMPT), llama.tokenize(other)
    edits = steering_edits(
        llama,
        parse_neurons("L1/N3,L1/N5"),
        prompt_length=batch.width,
        mode="patch",
        source=source,
        extra_columns=4,
    )
    src = capture(llama, source).get(1)[0]
    with _Recorder(llama, 1) as rec:
        greedy_generate(llama, batch, max_new_tokens=4, edits=edits)
    # exact: a copy of the source's activations, captured by the same forward of the source (same shapes)
    torch.testing.assert_close(rec.calls[0][:, [3, 5]], src[:, [3, 5]], rtol=0, atol=0)
    clean = capture(llama, batch).get(1)[0]
    assert not torch.equal(rec.calls[0][:, 4], src[:, 4])  # other neurons keep their own values
    torch.testing.assert_close(rec.calls[0][:, 4], clean[:, 4])
    assert len(rec.calls) > 1  # generation ran past the source's length without an error


def test_sweep_matches_steer_and_value_one_is_unsteered(llama, tmp_path):
    neurons = parse_neurons("L2/N7,L1/N5@-1")
    values = [0.0, 0.5, 1.0, 2.0, 4.0]
    result = sweep(llama, prompt=PROMPT, neurons=neurons, values=values, answers=ANSWERS[:2])
    assert result.probs[2] == result.baseline_probs  # scale 1 = unsteered, exactly
    for v, probs in zip(values, result.probs, strict=True):
        one = steer(llama, prompt=PROMPT, neurons=neurons, mode="scale", value=v, answers=ANSWERS[:2])
        assert probs == pytest.approx([c.prob_after for c in one.answers], abs=1e-7)
    # without answers: the three most likely unsteered tokens
    auto = sweep(llama, prompt=PROMPT, neurons=neurons, values=[1.0, 3.0], mode="add")
    assert len(auto.answers) == 3 and auto.baseline_probs == sorted(auto.baseline_probs, reverse=True)
    path = result.plot(tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert json.loads(result.to_json())["values"] == values


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="patch"), "give from_prompt"),
        (dict(mode="scale", from_prompt="a dog"), "only used by mode 'patch'"),
        (dict(mode="explode"), "unknown steering mode"),
        (dict(mode="set", value=float("nan")), "finite number"),
        (dict(neurons=parse_neurons("L9/N1")), "neuron L9/N1 does not exist"),
        (dict(neurons=parse_neurons("L1/N48")), "neuron L1/N48 does not exist"),
        (dict(neurons=[]), "no neurons given"),
        (dict(neurons=parse_neurons("L1/N3@5")), "position 5 of L1/N3@5 is outside the prompt"),
        (dict(mode="patch", from_prompt="a dog runs"), "equal token length"),
        (
            dict(mode="patch", from_prompt="a dog", neurons=parse_neurons("L1/N3@-3")),
            "outside the from_prompt",
        ),
        (dict(answers=[" are near"]), "must be one token"),
        (dict(generate=-1), "generate must be"),
        (dict(top=0), "top must be"),
    ],
)
def test_bad_steering_is_a_clear_error(llama, kwargs, message):
    args = dict(prompt=PROMPT, neurons=parse_neurons("L1/N3"), mode="scale", value=0.0) | kwargs
    with pytest.raises(NeurontraceError, match=message):
        steer(llama, **args)


def test_sweep_errors(llama):
    with pytest.raises(NeurontraceError, match="patch has no value"):
        sweep(llama, prompt=PROMPT, neurons=parse_neurons("L1/N3"), values=[1.0], mode="patch")
    with pytest.raises(NeurontraceError, match="no sweep values"):
        sweep(llama, prompt=PROMPT, neurons=parse_neurons("L1/N3"), values=[])


# -------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("steer-model")
    return save_tiny_folder(path)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="neurontrace")
    sub = parser.add_subparsers(dest="command")
    add_steer_parser(sub, _add_model_args)
    return parser.parse_args(argv)


def test_cli_steer_prints_tables_generation_and_sweep(folder, tmp_path, capsys):
    out_json, plot = tmp_path / "steer.json", tmp_path / "sweep.png"
    argv = ["steer", "--model", folder, "--device", "cpu", "--prompt", PROMPT, "--neurons", "L0/N3@0,L1/N5@0"]
    argv += ["--mode", "add", "--value", "20", "--answers", " are, is", "--generate", "5", "--top", "3"]
    argv += ["--sweep", "0,1,2", "--plot", str(plot), "--json", str(out_json)]
    run_steer(_parse(argv))
    out = capsys.readouterr().out
    assert "Steering L0/N3@0, L1/N5@0: add 20" in out and "KL(before || after)" in out
    assert "Generated before:" in out and "Generated after:" in out and "Sweep of add" in out
    data = json.loads(out_json.read_text())
    assert data["schema_version"] == 1 and [a["answer"] for a in data["steer"]["answers"]] == [" are", " is"]
    assert data["sweep"]["values"] == [0.0, 1.0, 2.0] and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--plot", "x.png"], "give --sweep"),
        (["--sweep", "0,a"], "cannot read sweep values"),
        (["--mode", "patch", "--from-prompt", "a dog", "--sweep", "1"], "--sweep varies the value"),
        (["--neurons", "L1-N3"], "cannot read neuron"),
    ],
)
def test_cli_steer_bad_input(folder, extra, message):
    argv = ["steer", "--model", folder, "--prompt", PROMPT, "--neurons", "L1/N3", *extra]
    with pytest.raises(NeurontraceError, match=message):
        run_steer(_parse(argv))


# ------------------------------------------------------------------------------------------ default model
@pytest.mark.default_model
def test_default_model_steered_generation_equals_decoding_without_cache(default_model):
    model = default_model
    prompt = "The keys to the cabinet"
    batch = model.tokenize(prompt)
    neurons = parse_neurons("L5/N100@0,L20/N7@-1")
    result = steer(
        model, prompt=prompt, neurons=neurons, mode="add", value=30.0, answers=[" are", " is"], generate=4
    )
    edits = steering_edits(model, neurons, prompt_length=batch.width, mode="add", value=30.0)
    assert result.generated_ids_after == _greedy_without_cache(model, batch.ids(0), edits, 4)
    assert result.kl_divergence > 0 and result.answers[0].token_id != result.answers[1].token_id


def test_command_modules_build_their_parsers_without_importing_torch():
    import subprocess
    import sys

    code = (
        "import sys, argparse; from neurontrace.cli import _add_model_args; "
        "from neurontrace.commands.steer import add_steer_parser; "
        "from neurontrace.commands.describe import add_describe_parser; "
        "sub = argparse.ArgumentParser().add_subparsers(); "
        "add_steer_parser(sub, _add_model_args); add_describe_parser(sub, _add_model_args); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from neurontrace.commands import steer as command
    from neurontrace.steering import MODES

    assert command.MODES == MODES
