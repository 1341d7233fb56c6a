"""sb-eval: long-context evaluation of stick-breaking attention language models."""

__version__ = "0.1.0"
