"""Circuits: node sets selected from attribution scores."""

from neurontrace.circuits.edges import EdgeScores, edge_scores, select_by_edges, sweep_edges
from neurontrace.circuits.hypotheses import HypothesisScores, attribute_prompts, score_hypotheses
from neurontrace.circuits.selection import Circuit, random_circuit_like, select_circuit

__all__ = [
    "Circuit",
    "EdgeScores",
    "HypothesisScores",
    "attribute_prompts",
    "edge_scores",
    "random_circuit_like",
    "score_hypotheses",
    "select_by_edges",
    "select_circuit",
    "sweep_edges",
]
