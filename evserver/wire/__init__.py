"""Wire layer: pure frame and message codecs, no Twisted imports."""
