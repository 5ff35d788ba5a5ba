"""Evaluation: baselines, the common defense interface, fitting, experiment runner and reports."""

from .baselines import CoverageScore, HyperNeuronScore, LGSConfig, MaskNet, local_gradient_smoothing, train_masknet
from .defenses import DefenseResult, LGSDefense, MaskNetDefense, NoDefense, ScoreDefense, ZMaskDefense
from .experiments import ExperimentSpec, run_experiments
from .lineup import DEFENSE_NAMES, build_defenses, deepest_layer
from .fitting import FitPlan, fit_zmask, layer_separability, patched_batches
from .runner import PatchSetting, evaluate, place_patches

__all__ = [
    "DEFENSE_NAMES", "CoverageScore", "DefenseResult", "ExperimentSpec", "FitPlan", "HyperNeuronScore", "LGSConfig", "LGSDefense", "MaskNet",
    "MaskNetDefense", "NoDefense", "PatchSetting", "ScoreDefense", "ZMaskDefense", "build_defenses", "deepest_layer", "evaluate", "fit_zmask", "layer_separability",
    "local_gradient_smoothing", "patched_batches", "place_patches", "run_experiments", "train_masknet",
]
