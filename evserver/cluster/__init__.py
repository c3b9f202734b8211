"""Multi-site resilience: the cluster's identity, trust and membership.

``ca`` holds the cluster certificate authority, the servers' certificates and
the TLS options for peer connections; ``tokens`` the join tokens.  See
``docs/cluster-design.rst``.
"""
