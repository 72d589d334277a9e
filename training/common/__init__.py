"""What both training stages use: config system, checkpoints, resumable data, run logs, image metrics, tiny models."""
