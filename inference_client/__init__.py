"""The client side of the Triton text-to-image contract, shared by everything that talks to the server.

- :mod:`.contract`: the tensors every model takes and returns, and the limits both sides apply;
- :mod:`.triton`: tritonclient's HTTP and gRPC clients set up for this contract (the key, long timeouts, no
  proxy), streaming with progress and cancellation, and the one-image probe;
- :mod:`.state`: the launcher's state dir as a client reads it (the inference key, ``server.json``) and when it
  can be trusted.

It imports neither torch nor diffusers, nor anything else of this project: the capability layer, the launcher
and the tools build on it (the layer contracts in ``pyproject.toml`` keep it so).
"""
