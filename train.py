"""Train with HPL (or SFT): ``python train.py fit -c configs/quickstart.yaml`` (the same as ``hpl-train``); ``--help``
lists every option."""

from hpl_lightning.cli import main

if __name__ == "__main__":
    main()
