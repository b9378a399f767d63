"""What a plugin builds on: the Backend, Loss, StoppingPolicy and DataFormat interfaces, their
option models, the hook specifications, the plugin manager and catalog, and dpo's errors."""
