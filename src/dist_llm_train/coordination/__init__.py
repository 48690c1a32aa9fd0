"""Coordination: the parameter server, the training modes, and the worker-side update engine.

Pure logic over tensors, driven alike by the real runtime and by the virtual-clock simulator.
"""

from dist_llm_train.coordination.build import build_coordinator, build_server, updates_per_step
from dist_llm_train.coordination.coordinator import (
    AsyncCoordinator,
    Coordinator,
    CoordinatorStats,
    StepReport,
    SubmitOutcome,
    SyncCoordinator,
    Update,
)
from dist_llm_train.coordination.flat import ParamLayout, flat_grad, flatten_params, load_flat_params
from dist_llm_train.coordination.parameter_server import ParameterServer
from dist_llm_train.coordination.staleness import AdaptiveBound, FixedBound, StalenessBound, staleness_weight
from dist_llm_train.coordination.worker import ComputedUpdate, WorkerEngine, WorkItem

__all__ = [
    "AdaptiveBound",
    "AsyncCoordinator",
    "ComputedUpdate",
    "Coordinator",
    "CoordinatorStats",
    "FixedBound",
    "ParamLayout",
    "ParameterServer",
    "StalenessBound",
    "StepReport",
    "SubmitOutcome",
    "SyncCoordinator",
    "Update",
    "WorkItem",
    "WorkerEngine",
    "build_coordinator",
    "build_server",
    "flat_grad",
    "flatten_params",
    "load_flat_params",
    "staleness_weight",
    "updates_per_step",
]
