"""Allows ``python -m charlm`` (and ``torchrun -m charlm``)."""

from charlm.cli.app import main

if __name__ == "__main__":
    main()
