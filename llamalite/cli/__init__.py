"""The command line: `llamalite VERB ...` (the console script is llamalite.cli:main)."""

from .main import main

__all__ = ["main"]
