"""Where predictions are scored: a global confusion matrix, its metrics and their reports."""

from wsi_espnet.evaluation.confusion import ConfusionMatrix
from wsi_espnet.evaluation.report import format_metrics_table, render_confusion_png, write_metrics_json

__all__ = ["ConfusionMatrix", "format_metrics_table", "render_confusion_png", "write_metrics_json"]
