"""Subcommands of the ``moco`` CLI, one module each."""
