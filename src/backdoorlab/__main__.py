"""``python -m backdoorlab``: the same command line as ``backdoorlab``."""

from backdoorlab.cli import main

main()
