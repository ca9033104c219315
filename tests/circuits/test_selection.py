"""Circuit selection by threshold, top-k and cumulative mass."""

from __future__ import annotations

import pytest
import torch

from neurontrace.circuits import random_circuit_like, select_circuit
from neurontrace.errors import NeurontraceError

SCORES = torch.tensor([[[0.5, -3.0, 0.1], [2.0, 0.0, -0.2]], [[0.05, 1.0, -4.0], [0.3, 0.0, 0.0]]])


def test_threshold_topk_and_mass():
    layers = [3, 7]
    assert select_circuit(SCORES, layers=layers, threshold=0.4).n_nodes == 5
    top = select_circuit(SCORES, layers=layers, top_k=2)
    assert {(n["layer"], n["position"], n["unit"]) for n in top.nodes()} == {(7, 0, 2), (3, 0, 1)}
    mass = select_circuit(SCORES, layers=layers, mass=0.6)  # 4 + 3 = 7 of 11.45 total
    assert mass.n_nodes == 2
    assert select_circuit(SCORES, layers=layers, mass=1.0).n_nodes == 9  # every non-zero node
    ordered = top.nodes(SCORES)
    assert ordered[0]["score"] == -4.0 and ordered[0]["node"] == "L7/N2"


def test_position_free_and_complement_and_random():
    summed = SCORES.sum(1)  # [L, d]
    circuit = select_circuit(summed, layers=[0, 1], top_k=3)
    assert not circuit.per_position and circuit.nodes()[0]["position"] is None
    assert circuit.complement().n_nodes == 3
    control = random_circuit_like(circuit, generator=torch.Generator().manual_seed(0))
    assert control.n_nodes == circuit.n_nodes and control.mask.shape == circuit.mask.shape


@pytest.mark.parametrize("kwargs", [{}, {"threshold": 1, "top_k": 2}, {"mass": 1.5}, {"top_k": -1}])
def test_bad_selection(kwargs):
    with pytest.raises(NeurontraceError):
        select_circuit(SCORES, layers=[0, 1], **kwargs)
