"""The capability layer over HTTP (``python -m capability serve``, docs/service.md): tokens, the JSON API with
progress as server-sent events, and a web page. Above the capability core: nothing in the core imports it."""
