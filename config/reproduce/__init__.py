"""reproduce.py's scales as train.py config files: each holds one scale's model and training settings, read
by reproduce.py through training/config.py and named on every training command it runs."""
