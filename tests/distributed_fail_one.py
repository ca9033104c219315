"""Run by tests/test_distributed.py under torchrun: process 1 meets a user error while process 0 waits for it
at a barrier (as in a multi-prompt graph run whose last graph cannot be written). Both must stop within seconds,
each with one line."""

from __future__ import annotations

import sys

import neurontrace.commands.graph as graph_command
from neurontrace import distributed
from neurontrace.cli import main
from neurontrace.errors import NeurontraceError


def run_graph(args) -> None:
    if distributed.world().rank == 1:
        raise NeurontraceError("a user error that only process 1 meets")
    distributed.barrier()  # waits for process 1, which has gone


graph_command.run_graph = run_graph
sys.exit(main(["graph", "--prompt", "unused"]))
