"""twistd plugin for evserver: ``twistd -n evserver --help``.

Only a lazy ServiceMaker lives here, so that a broken import inside evserver
can never break ``twistd --help`` or the discovery of other plugins.
"""

from twisted.application.service import ServiceMaker

evserver = ServiceMaker(
    "evserver",
    "evserver.tap",
    "evserver video relay server (encoder, viewer, relay and admin listeners)",
    "evserver",
)
