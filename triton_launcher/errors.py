"""The exceptions of the launcher side."""

from __future__ import annotations


class LauncherError(Exception):
    """Root of every error the launcher raises on purpose."""


class InstallationError(LauncherError):
    """No usable tritonserver (or Python backend) was found."""


class ServerStartError(LauncherError):
    """tritonserver exited, or did not become ready, during start-up. The message ends with its log's tail."""


class StopRequestedError(LauncherError):
    """A stop was requested while the server was being started or restarted: that start was given up."""
