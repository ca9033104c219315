"""``neurontrace train-sae``: train TopK SAEs (or transcoders) for many layers of a model at once, here.

The defaults fit the default model (SmolLM2-135M, 30 layers) on a laptop-class CPU: every layer's ``mlp_out``
in 25 minutes on 2 shared cores (measured, docs/results.md), sampling its own corpus offline. See :mod:`neurontrace.dictionaries.train`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from neurontrace.errors import NeurontraceError

_LAYERS = re.compile(r"^\d+(-\d+)?$")


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """``"0-29"``, ``"3,5"``, ``"0-3,7"`` -> sorted layers; None (every layer) for ``None`` or ``"all"``."""
    if text is None or text.strip().lower() == "all":
        return None
    layers: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not _LAYERS.match(part):
            raise NeurontraceError(f"--layers {text!r}: write layers as 0-29, 3,5 or 0-3,7 (or all)")
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if lo > hi:
            raise NeurontraceError(f"--layers {text!r}: the range {part} runs backwards")
        layers.update(range(lo, hi + 1))
    bad = [layer for layer in sorted(layers) if layer >= n_layers]
    if bad:
        raise NeurontraceError(
            f"--layers: layer {bad[0]} does not exist; the model has layers 0..{n_layers - 1}"
        )
    return sorted(layers)


def _slug(name: str) -> str:
    stem = Path(name.rstrip("/")).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


def default_out(model_name: str, kind: str, site: str) -> Path:
    what = "transcoders" if kind == "transcoder" else f"sae-{site}"
    return Path("results") / f"{what}-{_slug(model_name)}"


def run_train_sae(args: argparse.Namespace) -> None:
    from neurontrace.dictionaries.train import SAE_SITES, TrainConfig, fast_bfloat16, train_dictionaries

    kind = "transcoder" if args.transcoder else "sae"
    if args.transcoder and args.site is not None:
        raise NeurontraceError(
            "a transcoder reads the MLP's input and predicts its output; drop --site with --transcoder"
        )
    site = args.site or "mlp_out"
    if kind == "sae" and site not in SAE_SITES:
        raise NeurontraceError(f"--site {site!r}: an SAE is trained on one of {', '.join(SAE_SITES)}")
    for name in ("tokens", "d_sae", "k", "batch_size", "context", "held_out"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise NeurontraceError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.context is not None and args.context < 3:
        raise NeurontraceError(f"--context must be at least 3 tokens (BOS and two more), got {args.context}")
    if args.lr is not None and not 0 < args.lr < 1:
        raise NeurontraceError(f"--lr must be between 0 and 1, got {args.lr}")
    out = Path(args.out) if args.out else default_out(args.model, kind, site)
    if out.exists() and not out.is_dir():
        raise NeurontraceError(f"--out {out} is a file; training writes a folder")
    from neurontrace.dictionaries.corpus import HF_PREFIX, SAMPLE_PREFIX

    corpus = str(args.corpus)  # a missing local corpus stops before the model loads and --out is made
    if not corpus.startswith((HF_PREFIX, SAMPLE_PREFIX)) and not Path(corpus).expanduser().exists():
        raise NeurontraceError(f"no such corpus file or folder: {corpus}")
    from neurontrace.io import check_folder_writable

    check_folder_writable(out, what="--out")  # a read-only disk: before the model loads
    if args.dtype == "auto":
        from neurontrace.models.loading import resolve_device

        args.dtype = "bfloat16" if fast_bfloat16(resolve_device(args.device)) else "float32"
    from neurontrace.commands._common import model_from_args

    model = model_from_args(args)
    config = TrainConfig(kind=kind, site=site, layers=parse_layers(args.layers, model.n_layers), seed=args.seed,
                         precision=None if args.precision == "auto" else args.precision)  # fmt: skip
    for name in ("tokens", "d_sae", "k", "lr", "batch_size", "context", "held_out"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    n_layers = model.n_layers if config.layers is None else len(config.layers)
    what = "transcoders" if kind == "transcoder" else f"SAEs on {site}"
    print(f"Model: {model.name} ({str(model.dtype).removeprefix('torch.')})   training {n_layers} {what}: d_sae {config.d_sae}, k {config.k}, "
          f"{config.tokens:,} tokens, corpus {args.corpus}")  # fmt: skip
    result = train_dictionaries(
        model,
        out,
        config,
        corpus=args.corpus,
        fresh=args.fresh,
        progress=True,
        log=print,
        corpus_cache=args.corpus_cache,
    )
    s = result.seconds
    if not result.already_done:
        print(f"trained {result.tokens:,} tokens in {s['training']:.0f} s (sampling {s['sampling']:.0f} s, "
              f"metrics {s['evaluation']:.0f} s)")  # fmt: skip
    print(f"\nHeld-out metrics ({config.held_out:,} tokens; clean next-token loss {result.clean_loss:.4f} nats; "
          "loss + = loss with the reconstruction in place of the site minus the clean loss):")  # fmt: skip
    print(result.table())
    use = f"--site transcoder:{out}" if kind == "transcoder" else f"--site sae:{out}"
    print(f"\nwrote {out} (training.json: settings and metrics); use it with {use}")


def add_train_sae_parser(sub, add_model_args) -> None:
    from neurontrace.dictionaries import train as t

    p = sub.add_parser(
        "train-sae",
        help="train TopK sparse autoencoders (or transcoders) for many layers at once, on this machine",
        description=(
            "Train one TopK dictionary per layer (Gao et al. 2024: ReLU, keep the k largest latents; unit-norm "
            "decoder rows; MSE normalised by the target's variance plus the AuxK loss on dead latents) from one "
            "stream of the frozen model's activations. An SAE (default) reconstructs a site; with --transcoder the "
            "dictionary reads the MLP's input and predicts the MLP's output. All layers train together, stacked "
            "in batched matmuls. The output folder is a basis for the other commands: one SAELens folder per layer "
            "(OUT/blocks.L.hook_mlp_out, ..., use --site sae:OUT), or a circuit-tracer transcoder set (--site "
            "transcoder:OUT), and OUT/training.json with the settings and held-out metrics: variance explained, "
            "L0, dead latents, and the next-token loss increase when the reconstruction replaces the site. A "
            "checkpoint is written every 60 s ($NEURONTRACE_CHECKPOINT_SECONDS); rerunning the same command "
            "resumes it, and a finished folder says 'done already'. The defaults train all 30 mlp_out layers of "
            "the default model (SmolLM2-135M) in about 25 minutes on 2 CPU cores (transcoders: 43 minutes, "
            "measured on shared cores), sampling the corpus from the model itself (offline)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.set_defaults(dtype="auto")
    p.add_argument(
        "--site",
        default=None,
        help="what the SAEs reconstruct: mlp_out (default), attn_out, resid or neurons (not with --transcoder)",
    )
    p.add_argument(
        "--transcoder",
        action="store_true",
        help="train transcoders: MLP input -> MLP output (circuit-tracer's format) instead of SAEs",
    )
    p.add_argument("--layers", default="all", help="layers to train, e.g. 0-29, 3,5 or 0-3,7")
    p.add_argument(
        "--corpus",
        default=t.default_corpus(),
        help="training text: a .txt/.md file (documents split at blank lines), a .jsonl file (a 'text' field a "
        "line), a folder of them, hf:NAME[:CONFIG][:SPLIT] (a Hugging Face dataset, streamed; needs the datasets "
        "package and the network), or sample:N (N tokens sampled from the model itself, offline; cached in OUT). "
        "The first --held-out tokens are kept for the metrics; a corpus shorter than --tokens is passed over "
        "several times",
    )
    p.add_argument(
        "--corpus-cache",
        metavar="FILE",
        default=None,
        help="another run's OUT/corpus-sample.safetensors: reuse its sample:N samples instead of sampling again "
        "(e.g. transcoders on the SAEs' corpus), read only; used when drawn from the same model, seed and "
        "context, otherwise the corpus is sampled into OUT",
    )
    p.add_argument("--tokens", type=int, default=None, help=f"training tokens (default {t.DEFAULT_TOKENS:,})")
    p.add_argument("--d-sae", type=int, default=None, help=f"latents per layer (default {t.DEFAULT_D_SAE})")
    p.add_argument(
        "--k", type=int, default=None, help=f"active latents per token, TopK (default {t.DEFAULT_K})"
    )
    p.add_argument(
        "--lr", type=float, default=None, help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384))"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help=f"tokens per Adam step (default {t.DEFAULT_BATCH})"
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help=f"tokens per block, BOS included (default {t.DEFAULT_CONTEXT})",
    )
    p.add_argument(
        "--held-out",
        type=int,
        default=None,
        help=f"tokens kept out of training for the metrics (default {t.DEFAULT_HELD_OUT})",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation, the shuffling and sample:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="dense matmuls of the training step (encoder, AuxK); auto: bfloat16 where the device is fast at it",
    )
    p.add_argument(
        "--out",
        help="output folder (default results/sae-SITE-MODEL or results/transcoders-MODEL)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: remove what an earlier run wrote into --out (dictionaries, checkpoint, samples)",
    )
    p.epilog = (
        "--dtype auto (this command's default) loads the model in bfloat16 where the device multiplies it fast "
        "(CUDA, CPUs with AVX-512 BF16 / AMX), else float32."
    )
