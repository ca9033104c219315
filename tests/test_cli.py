"""The CLI: `inspect` on a tiny local model, and bad input ends in one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import save_tiny_folder

from neurontrace.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-model")
    return save_tiny_folder(path)


def test_inspect_prints_tokens_neurons_and_zero_effect(folder, capsys, tmp_path):
    out_json = tmp_path / "inspect.json"
    argv = ["inspect", "--model", folder, "--prompt", "the keys to the cabinet", "--top", "3"]
    argv += ["--zero", "L1/N3,L2/N5@-1", "--answer", " are", "--contrast", " is", "--json", str(out_json)]
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0
    assert "Top next tokens:" in out.out and "Most active neurons" in out.out
    assert "With L1/N3, L2/N5@-1 zeroed" in out.out and "KL(before || after)" in out.out
    assert "logit(' are') - logit(' is')" in out.out
    assert "[neurontrace] loading" in out.err  # progress while loading
    data = json.loads(out_json.read_text())
    assert data["schema_version"] == 1 and len(data["active"]) == 3 and len(data["top"]) == 3


def test_inspect_counterfactual(folder, capsys):
    rc = main(["inspect", "--model", folder, "--prompt", "the keys are", "--counterfactual", "the key is"])
    assert rc == 0 and "differ most from 'the key is'" in capsys.readouterr().out


def test_models_lists_families(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "GPT-NeoX" in out and "smollm2-135m" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model.gguf"], "no such model file"),
        (["--prompt", ""], "the prompt is empty"),
        (["--zero", "L1-N3"], "cannot read neuron"),
        (["--zero", "L9/N3"], "neuron L9/N3 does not exist"),
        (["--answer", " are near"], "must be one token"),
        (["--counterfactual", "the key"], "unequal token lengths"),
        (["--position", "40"], "outside prompt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folder, capsys, args, message):
    base = {"--model": folder, "--prompt": "the keys to the cabinet"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["inspect"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("neurontrace: error:")]
    assert len(err) == 1 and message in err[0]


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    proc = subprocess.run(
        [sys.executable, "-m", "neurontrace.cli", "inspect", "--model", str(bad), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("neurontrace: error: could not read GGUF file")


def test_attribute_prompt_prints_a_verified_table(folder, capsys):
    argv = ["attribute", "--model", folder, "--prompt", "the keys to the cabinet", "--answer", " are"]
    argv += [
        "--contrast",
        " is",
        "--counterfactual",
        "the key to the cabinets",
        "--top",
        "5",
        "--verify",
        "5",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "method: relp" in out and "exact" in out and "'cabinet'" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and all(r[1].startswith("L") for r in rows)


def test_attribute_dataset_writes_a_result_file(folder, capsys, tmp_path):
    from neurontrace.attribution.result import AttributionResult
    from neurontrace.tasks import Pair, save_pairs

    data = tmp_path / "pairs.jsonl"
    save_pairs(
        data,
        [
            Pair("the keys are", "the key are", " near", " on"),
            Pair("a dog runs", "a dogs runs", " to", " on"),
        ],
    )
    out = tmp_path / "res.safetensors"
    assert (
        main(["attribute", "--model", folder, "--dataset", str(data), "--method", "atp", "--out", str(out)])
        == 0
    )
    assert "2 examples" in capsys.readouterr().out
    result = AttributionResult.load(out)
    assert result.n_examples == 2 and result.meta["method"] == "atp"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "the keys", "--answer", " are near"], "must be one token"),
        (["--prompt", "the keys", "--answer", " are", "--contrast", " is", "--counterfactual", "the key is"],
         "unequal token lengths"),
        (["--dataset", "/no/such.jsonl"], "no such dataset file"),
        (["--prompt", "the keys", "--answer", " are", "--metric", "logit-diff"], "needs a contrast"),
    ],
)  # fmt: skip
def test_attribute_bad_input(folder, capsys, args, message):
    assert main(["attribute", "--model", folder, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("neurontrace: error:") and message in err[-1]


def test_attribute_empty_dataset(folder, capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["attribute", "--model", folder, "--dataset", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_tasks_writes_train_and_test(tmp_path, capsys):
    from neurontrace.tasks import load_pairs

    assert main(["tasks", "--task", "sva-within-rc", "--n", "40", "--out", str(tmp_path)]) == 0
    train, test = (
        load_pairs(tmp_path / "within_rc_train.jsonl"),
        load_pairs(tmp_path / "within_rc_test.jsonl"),
    )
    assert len(train) + len(test) == 40 and len(test) == 8


def test_graph_writes_json_full_graph_and_viewer(folder, capsys, tmp_path):
    from neurontrace.graphs.export import load_graph, validate_circuit_tracer
    from neurontrace.viewer import graph_from_html

    argv = [
        "graph",
        "--model",
        folder,
        "--prompt",
        "the keys to the cabinet",
        "--answer",
        " are",
        "--answer",
        " is",
    ]
    assert (
        main([*argv, "--out", str(tmp_path), "--slug", "keys", "--node-threshold", "0.01", "--supernodes"])
        == 0
    )
    out = capsys.readouterr().out
    assert "neuron nodes" in out and "viewer (offline)" in out
    data = json.loads((tmp_path / "keys.json").read_text())
    validate_circuit_tracer(data)
    assert {n["token"] for n in data["nodes"] if n["feature_type"] == "logit"} == {"are", "is"}
    assert all(
        "top_logit_effects" in n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"
    )
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(set(group[1:]) <= ids for group in data["qParams"]["supernodes"])
    assert graph_from_html((tmp_path / "keys.html").read_text()) == data
    assert load_graph(tmp_path / "keys.neurontrace.json").meta["model"] == folder


def test_graph_contexts_reach_the_viewer_data(folder, capsys, tmp_path):
    from neurontrace.describe import top_contexts
    from neurontrace.models.loading import load_model
    from neurontrace.neurons import NeuronId

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the keys to the cabinet are here . the key to the door is old .\n" * 20)
    argv = ["graph", "--model", folder, "--prompt", "the keys to the cabinet", "--answer", " are"]
    assert main([*argv, "--out", str(tmp_path), "--node-threshold", "0.01", "--contexts", str(corpus)]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "graph.json").read_text())
    neurons = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert neurons and all(n["top_contexts"] for n in neurons)
    node = neurons[0]
    layer, index = int(node["layer"]), int(node["node_id"].split("_")[1])
    sign = NeuronId.polarity(node["activation"])
    direct = top_contexts(
        load_model(folder), NeuronId(layer, index, sign), corpus=str(corpus), k=5, use_cache=False
    )
    want = next(iter(direct.values())).contexts
    assert [c["activation"] for c in node["top_contexts"]] == pytest.approx([c.activation for c in want])
    assert [c["token"] for c in node["top_contexts"]] == [c.token for c in want]


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("neurontrace: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


BLOCK = '<script type="application/json" id="graph-data">'  # a viewer page's graph block


def _graph_json(q_params: dict) -> str:
    return json.dumps({"metadata": {}, "qParams": q_params, "nodes": [], "links": []})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("deep.json", "[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ("deep.html", f"{BLOCK}{'[' * 200_000 + ']' * 200_000}</script>", "nested too deeply"),
        ("cut.html", f'{BLOCK}{{"nodes": [</script>', "not JSON"),
        ("supernodes.json", _graph_json({"supernodes": '[["x",{"y":1}],"str",3]'}), "qParams.supernodes[0]"),
        ("letters.json", _graph_json({"supernodes": '["str"]'}), "qParams.supernodes[0]"),  # not s, t, r
        ("number.json", _graph_json({"supernodes": "3"}), "qParams.supernodes must be a list"),
        ("clerps.json", _graph_json({"clerps": [[1, 2]]}), "qParams.clerps[0]"),
        ("pins.json", _graph_json({"pinnedIds": {"a": 1}}), "qParams.pinnedIds"),
    ],
)
def test_view_of_a_damaged_or_odd_file_is_one_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["view", str(path), "--out", str(out)]) == 2
    line = _one_error(capsys.readouterr().err)
    assert str(path) in line and message in line, line
    assert not out.exists()


@pytest.mark.parametrize("spec", ["hf:../..", "hf:owner/..", "hf:a--b/c", "hf:.x/y", "hf://../x/y"])
def test_an_invalid_hub_id_is_one_line_before_any_lookup(monkeypatch, capsys, tmp_path, spec):
    import huggingface_hub

    from neurontrace.dictionaries.hub import parse_hub_spec, resolve_dictionary
    from neurontrace.errors import NeurontraceError

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up"))
    with pytest.raises(NeurontraceError, match="not a hub repo id"):
        resolve_dictionary(spec)
    argv = ["graph", "--model", "/no/such/model", "--prompt", "the keys", "--site", f"sae:{spec}"]
    assert main([*argv, "--out", str(tmp_path / "g")]) == 2  # the site is named, not the model: checked first
    assert "not a hub repo id" in _one_error(capsys.readouterr().err)
    assert parse_hub_spec("hf:owner-1/repo.name_2/layer_0@main") == ("owner-1/repo.name_2", "layer_0", "main")
