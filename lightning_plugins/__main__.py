"""``python -m lightning_plugins`` is the ``lightning-plugins`` command."""

from lightning_plugins.cli import main

main()
