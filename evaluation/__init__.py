"""Evaluation shared by the trainer and batch prediction: metrics from (label, probabilities)
pairs or a confusion matrix, the metrics file, the report table and the plots. numpy and
matplotlib only; it imports neither ``pipeline`` nor ``training``."""
