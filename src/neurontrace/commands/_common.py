"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse

from neurontrace import distributed
from neurontrace.models.loading import load_model, parse_device_map
from neurontrace.models.model import NeuronModel


def model_from_args(args: argparse.Namespace) -> NeuronModel:
    """Load the model named by the common ``--model/--device/--dtype`` options, with progress on stderr."""
    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        device_map=parse_device_map(getattr(args, "device_map", None)),
        offload_folder=getattr(args, "offload_folder", None),
        trust_remote_code=args.trust_remote_code,
        progress=distributed.is_main(),
    )
