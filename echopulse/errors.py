"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class EchoPulseError(Exception):
    """A problem with the user's input or configuration (a path, a URI, a file's contents)."""


class ConfigError(EchoPulseError):
    """A bad flag, recipe or configuration; raised before any work starts."""
