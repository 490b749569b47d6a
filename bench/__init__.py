"""The lifecycle benchmark (`python bench/lifecycle.py --help`): orderflow's whole pipeline under a
steady or a burst load, a capacity search, and the same lifecycle on bare Temporal as a baseline."""
