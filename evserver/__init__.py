"""evserver: a clustered Twisted video relay server."""

__version__ = "0.1.0"
