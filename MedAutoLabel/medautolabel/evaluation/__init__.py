"""Evaluation of predicted labels against references (``medautolabel evaluate``; docs/evaluation.md)."""

from medautolabel.evaluation.evaluate import evaluate_cases, evaluate_labelmaps, write_report
from medautolabel.evaluation.metrics import classification_metrics, segment_metrics

__all__ = ["classification_metrics", "evaluate_cases", "evaluate_labelmaps", "segment_metrics", "write_report"]
