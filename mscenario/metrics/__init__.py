"""Evaluation metrics (exact AUC / gAUC / LogLoss / thresholded metrics), reports and plots."""
from mscenario.metrics.classification import (METRIC_KEYS, accuracy, auc, compute_metrics,
                                              evaluate_by_scenario, f1, gauc, logloss,
                                              precision, recall, roc_curve, roc_curves)
from mscenario.metrics.report import format_table

__all__ = [
    "METRIC_KEYS", "accuracy", "auc", "compute_metrics", "evaluate_by_scenario", "f1", "gauc",
    "logloss", "precision", "recall", "roc_curve", "roc_curves", "format_table",
]
