"""State layer: sans-IO state machines driven by events and an injected clock."""
