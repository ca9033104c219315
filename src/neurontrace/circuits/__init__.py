"""Circuits: node sets selected from attribution scores."""

from neurontrace.circuits.selection import Circuit, random_circuit_like, select_circuit

__all__ = ["Circuit", "random_circuit_like", "select_circuit"]
