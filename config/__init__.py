"""Training configurations for train.py (plain Python; see train.py's docstring for the rules)."""
