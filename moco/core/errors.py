"""Every error a user can fix, declared here, under one base class.

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


class DataError(MocoError, ValueError):
    """A problem with the user's data (a folder, an image, a shard), with how to fix it.

    Raised in a DataLoader worker, it reaches the main process re-created by torch with the
    worker's whole traceback as its message; ``str()`` gives back the original message only.
    """

    def __str__(self) -> str:
        msg = super().__str__()
        if "Original Traceback" in msg and "DataError: " in msg:
            return msg.rsplit("DataError: ", 1)[1].strip()
        return msg


class CheckpointError(MocoError, ValueError):
    """A checkpoint file that cannot be used, with the reason and the fix."""


class DeviceError(ConfigError):
    """A ``--device`` or ``--precision`` this machine cannot run, with what to pass instead."""


class DistributedError(ConfigError):
    """A multi-process run that cannot start, with what to change."""


class SanityCheckError(MocoError, RuntimeError):
    """The frozen backbone changed during linear training (it must not: ``main_lincls.py``'s
    ``sanity_check``)."""


class AblationError(ConfigError):
    """A grid file or run folder that cannot be used, with what to change."""


class Detectron2Error(MocoError, ValueError):
    """A backbone or setting that detectron2 (or its C4 configs) cannot use, with the fix."""


class DownloadError(MocoError, OSError):
    """A file that could not be downloaded (offline, HTTP error, a connection closed early, a
    checksum that does not match), with the URL and how to pass a local copy instead."""


class HubError(MocoError, RuntimeError):
    """A released model, a Hugging Face Hub repository or a model folder that cannot be used,
    with what to do."""
