"""``python -m hpl_lightning.experiment``: the same as ``hpl-experiment``."""

from hpl_lightning.experiment.command import console_main

console_main()
