"""Training: the recipe (recipe.py, top to bottom) over its parts: the data pipeline, the step (noise, targets,
conditioning, loss), optimizers and schedules, checkpoints, the plan, sampling and logs."""
