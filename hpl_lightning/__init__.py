"""hpl-lightning: Hierarchical Preference Learning for long-horizon LLM agents, on PyTorch Lightning."""

from hpl_lightning.console import quiet

__version__ = "0.1.0"

quiet()  # before any submodule imports the libraries whose intended-behaviour messages it filters
