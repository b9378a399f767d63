"""Built-in loggers: TensorBoard, Weights & Biases and MLflow (``--log-to``)."""
