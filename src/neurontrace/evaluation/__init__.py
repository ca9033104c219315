"""Evaluation of circuits by ablation: faithfulness and completeness curves (Marks et al.)."""

from neurontrace.evaluation.faithfulness import (
    ABLATIONS,
    Curve,
    EvalSet,
    faithfulness_of,
    prepare_eval,
    sweep,
)

__all__ = ["ABLATIONS", "Curve", "EvalSet", "faithfulness_of", "prepare_eval", "sweep"]
