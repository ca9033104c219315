"""Circuits: node sets selected from attribution scores."""

from neurontrace.circuits.hypotheses import HypothesisScores, attribute_prompts, score_hypotheses
from neurontrace.circuits.selection import Circuit, random_circuit_like, select_circuit

__all__ = [
    "Circuit",
    "HypothesisScores",
    "attribute_prompts",
    "random_circuit_like",
    "score_hypotheses",
    "select_circuit",
]
