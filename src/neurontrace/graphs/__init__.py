"""Per-prompt attribution graphs: construction, pruning, export (circuit-tracer/Neuronpedia JSON) and loading."""
