"""Start, probe and stop the real tritonserver for this project's model repository.

No torch is imported here (the tiny models are built lazily, only when asked for): the capability layer and
clients can import :mod:`.paths` and :mod:`.contract` cheaply.
"""

from .errors import LauncherError, ServerStartError

__all__ = ["LauncherError", "ServerStartError"]
