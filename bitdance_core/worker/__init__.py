"""The model-worker process: loads a family's model, asks the planner, runs the engine loop."""
