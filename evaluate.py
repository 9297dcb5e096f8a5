"""Evaluate agents and check environments: ``python evaluate.py run --help`` (the same as ``hpl-evaluate``; see
``hpl_lightning/evaluation_cli.py``)."""

from hpl_lightning.evaluation_cli import main

if __name__ == "__main__":
    main()
