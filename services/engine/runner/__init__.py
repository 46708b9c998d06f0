"""The model runner: a step's batch flattened into tensors and run (eager or CUDA graphs)."""
