"""The training machinery that train_dist.py runs, one job a module: the task's loading
(task_loader), its check before training (task_check) and helpers (task_helpers), train_dist.py's
flags, which samples each rank trains (dealing) and the record of them (sample_log), optimizer
steps (steps), validation, checkpoints, the ranks together (distributed), metrics, logs, health,
folders, and the exit codes the launcher shares (errors)."""
