"""hpl-lightning: Hierarchical Preference Learning for long-horizon LLM agents, on PyTorch Lightning."""

__version__ = "0.1.0"
