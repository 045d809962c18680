"""Run infrastructure shared by training and sweeps: MLflow records and the tracking URI
(``tracking``), and stopping on Ctrl-C or SIGTERM without losing the record (``signals``). Knows
configs and torch, not Lightning, Optuna or the sweep."""
