"""Training: configuration, the run's setup stages, the loop and its objectives, the
distributed strategy, reference log-prob cache, checkpoints, run directory, evaluation and
reporting."""
