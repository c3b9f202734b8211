"""Command-line tools: encoder, viewer and benchmark clients."""
