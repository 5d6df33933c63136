"""The one base class of the errors a user can fix.

Every problem caused by what the user gave (a setting, a file, a folder, a checkpoint) is a
:class:`MocoError` whose message is one line: what is wrong, where it came from (the flag,
the YAML key and file, the ``--set`` name), and what to do. The ``moco`` command prints it
without a traceback and exits with status 2; anything else (a bug) keeps its traceback.

The subclasses also derive from the built-in class they replace (``ValueError``,
``RuntimeError``), so code that caught those still catches them.
"""

from __future__ import annotations


class MocoError(Exception):
    """A problem the user can fix; ``str()`` is the one-line message shown by the CLI."""


class ConfigError(MocoError, ValueError):
    """A setting of the wrong type, out of range, unknown, or inconsistent with another."""


class RunError(MocoError, RuntimeError):
    """A run that cannot start or must stop (folder in use, divergence, a failed save)."""


class FolderInUseError(MocoError, RuntimeError):
    """A run folder another process is writing (it holds the folder's lock)."""


class OutputError(MocoError, ValueError):
    """An output path that would overwrite an input or write into a data folder."""
