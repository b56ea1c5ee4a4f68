"""w2sr: Weak-to-Strong Reasoning on Ray."""

__version__ = "0.1.0"
