"""I/O layer: thin Twisted protocols over the wire and state layers."""
