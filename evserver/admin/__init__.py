"""The admin web site (HTTPS, port 9443 by default) of an evserver server.

* :func:`evserver.admin.site.make_admin_site` builds the twisted.web Site.
* :class:`evserver.admin.tlsreload.ReloadingTLSOptions` serves it (and, if
  wanted, the other ports) with a certificate that is re-read when its files
  change.

Pages are server-rendered (twisted.web.template); ``static/live.js`` refreshes
their live parts from the JSON API under ``/api/`` (see ``docs/admin-api.yaml``).
"""

from __future__ import annotations

from evserver.admin.site import AdminSite, make_admin_site
from evserver.admin.tlsreload import ReloadingTLSOptions

__all__ = ["AdminSite", "ReloadingTLSOptions", "make_admin_site"]
