"""Server-side logic shared by every Triton model in ``model_repository/``.

The ``model.py`` files there are thin Triton glue; everything they do lives here so that it can be imported and
unit-tested without Triton. Modules are laid out by concern:

- :mod:`.families`: the four pipeline families and what each one's folder says about it (no torch);
- :mod:`.settings`: the typed view of a model's ``config.pbtxt`` parameters (no torch);
- :mod:`.validation`: one request's tensors → a checked :class:`~.validation.GenerationRequest` (no torch);
- :mod:`.batching`: which requests of a dynamic batch can share one pipeline call (no torch);
- :mod:`.loading`: weights from a folder or the hub, onto the instance's device (torch);
- :mod:`.engine`: pipeline calls → uint8 images (torch);
- :mod:`.service`: one batch of raw requests → one outcome per request;
- :mod:`.triton_model`: the ``TritonPythonModel`` every ``model.py`` exposes;
- :mod:`.tiny`: tiny pipelines, trained here on captioned shapes, for tests and the demo.

This package must import on Python 3.10: the NGC tritonserver 24.10 image runs ``model.py`` with it.
"""
