"""dfc-ray: Dedicated Feature Crosscoders on a (RL-fine-tuned, base) model pair, on Ray."""

__version__ = "0.1.0"
