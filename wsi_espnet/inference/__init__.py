"""Running a model: whole-image prediction and export to other runtimes."""

from wsi_espnet.inference.predict import Prediction, predict, predict_logits, preprocess

__all__ = ["Prediction", "predict", "predict_logits", "preprocess"]
