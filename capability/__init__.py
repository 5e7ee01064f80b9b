"""Capability-based access to text-to-image generation on Triton: mint, delegate, give, revoke, textToImage.

Light by design: no torch or diffusers, so host applications can embed it. See docs/capabilities.md.
"""

from inference_client.contract import Progress

from .capabilities import GENERATE, MINT, Capabilities, Capability, GenerateParams
from .errors import (
    CapabilityError,
    ConcurrencyLimitError,
    DeniedError,
    GenerationCancelledError,
    GenerationError,
    InvalidOptionError,
    InvalidParamsError,
    ModelNotServedError,
    RequestRefusedError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    StoreError,
    TemporarilyUnavailableError,
    UnauthenticatedError,
    UnknownCapabilityError,
    UnknownServerError,
)
from .generation import Generation
from .layer import CapabilityHandle, CapabilityLayer

__all__ = [
    "GENERATE",
    "MINT",
    "Capabilities",
    "Capability",
    "CapabilityError",
    "CapabilityHandle",
    "CapabilityLayer",
    "ConcurrencyLimitError",
    "DeniedError",
    "GenerateParams",
    "Generation",
    "GenerationCancelledError",
    "GenerationError",
    "InvalidOptionError",
    "InvalidParamsError",
    "ModelNotServedError",
    "Progress",
    "RequestRefusedError",
    "ServerBusyError",
    "ServerError",
    "ServerUnavailableError",
    "StoreError",
    "TemporarilyUnavailableError",
    "UnauthenticatedError",
    "UnknownCapabilityError",
    "UnknownServerError",
]
