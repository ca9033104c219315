"""Steering: edit chosen neurons (scale, set, add, patch) and measure the change in prediction and generated text."""

from neurontrace.steering.clusters import Cluster, ClusterSteerResult, steer_cluster
from neurontrace.steering.steer import (
    MODES,
    AnswerChange,
    SteerResult,
    SweepResult,
    check_neurons,
    greedy_generate,
    steer,
    steering_edits,
    sweep,
)

__all__ = [
    "MODES",
    "AnswerChange",
    "Cluster",
    "ClusterSteerResult",
    "SteerResult",
    "SweepResult",
    "check_neurons",
    "greedy_generate",
    "steer",
    "steer_cluster",
    "steering_edits",
    "sweep",
]
