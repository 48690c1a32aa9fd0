"""dist-llm-train: train language models across heterogeneous, unreliable, possibly malicious workers."""

__version__ = "0.1.0"
