"""Triton entry point: the Python backend loads ``TritonPythonModel`` from this file.

Every family shares one implementation (``diffusers_backend.triton_model``); the pipeline family is detected
from the weights named in this model's ``config.pbtxt``. Keep this file free of logic: it cannot be
unit-tested without Triton.
"""

from diffusers_backend.triton_model import DiffusersTritonModel


class TritonPythonModel(DiffusersTritonModel):
    """The class name Triton looks for."""
