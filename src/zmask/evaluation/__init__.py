"""Evaluation: baselines, the defense registry, fitting, experiment runner and reports."""

from ..contracts import DefenseResult, FitContext
from .baselines import CoverageScore, HyperNeuronScore, LGSConfig, MaskNet, local_gradient_smoothing, train_masknet
from .defenses import (DEFENSES, CoverageDefense, HyperNeuronDefense, LGSDefense, MaskNetDefense, NoDefense, ScoreDefense, ZMaskDefense,
                       report_rows)
from .experiments import ExperimentSpec, run_experiments
from .fitting import FitPlan, fit_zmask, patched_batches, training_shares
from .layer_selection import LayerEvidence, LayerSelection, candidate_layers, choose_layers, layer_evidence, select_layers
from ..core.capture import deepest_layer
from .lineup import build_defenses, fit_context
from .runner import DefenseMetrics, PatchSetting, evaluate, first_output, place_patches
from .uncertainty import Bootstrap, BootstrapConfig

__all__ = [
    "DEFENSES", "Bootstrap", "BootstrapConfig", "CoverageDefense", "DefenseMetrics", "CoverageScore", "DefenseResult", "ExperimentSpec", "FitContext", "FitPlan", "HyperNeuronDefense",
    "HyperNeuronScore", "LGSConfig", "LGSDefense", "MaskNet", "MaskNetDefense", "NoDefense", "PatchSetting", "ScoreDefense", "ZMaskDefense",
    "build_defenses", "deepest_layer", "evaluate", "first_output", "fit_context", "fit_zmask", "LayerEvidence", "LayerSelection", "candidate_layers", "choose_layers", "layer_evidence", "select_layers", "local_gradient_smoothing",
    "patched_batches", "place_patches", "training_shares", "report_rows", "run_experiments", "train_masknet",
]
