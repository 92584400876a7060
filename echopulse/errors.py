"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class EchoPulseError(Exception):
    """A problem with the user's input or configuration (a path, a URI, a file's contents)."""


class ConfigError(EchoPulseError):
    """A bad flag, recipe or configuration; raised before any work starts."""


class OutputWriteError(EchoPulseError):
    """A file could not be written (storage refusing writes, a missing bucket, a full disk); names the file."""


class RunStopped(EchoPulseError):
    """A run stopped part-way (storage refusing writes, a lost node); what it finished is kept and
    the same command with ``--resume`` continues. The CLI exits with ``EXIT_RESUMABLE``."""
