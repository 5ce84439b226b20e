"""Training: the configuration (defaults, config files, --key=value), the resumable state, checkpoints
checked as data, and the run mechanics train.py drives."""
