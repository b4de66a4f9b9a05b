"""
quayfront: a PROXY-protocol-aware TLS front end for container registries.

The connection chain is TCP -> PROXY header -> TLS -> HTTP -> streaming
reverse proxy; each layer lives in its own module.
"""

__version__ = "0.1.0"
