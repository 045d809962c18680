"""Training: Lightning module, data assembly, evaluation and MLflow tracking of single runs."""
