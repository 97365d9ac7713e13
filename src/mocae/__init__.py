"""mocae: helpful, harmless and honest alignment with a Mixture of Calibrated Experts."""

__version__ = "0.1.0"

AXES = ("helpful", "harmless", "honest")
