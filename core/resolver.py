"""The DNS resolver every role uses: the configured servers, timeouts, and a TTL cache.

Interface: ``make_resolver(settings, lifetime, cache_size) -> dns.asyncresolver.Resolver``.
``dnsresolvers`` entries are ``addr``, ``addr:port`` or ``[v6addr]:port``; empty means the system's
(``/etc/resolv.conf``). ``lifetime`` bounds a whole lookup, each try waits at most 2 s of it; answers
(and NXDOMAIN) are kept for their TTL, failures are not (dnspython's LRU cache).

Failures: none here; lookups raise dnspython's exceptions. Settings: ``dnsresolvers``.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.resolver

from core.config import Settings


def make_resolver(settings: Settings, lifetime: float, cache_size: int) -> dns.asyncresolver.Resolver:
    if not settings.dnsresolvers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        hosts, ports = [], {}
        for entry in settings.dnsresolvers:  # 127.0.0.1, 127.0.0.1:5353, ::1, [::1]:5353
            if entry.startswith("["):
                host, _, port = entry[1:].partition("]")
                port = port.lstrip(":")
            elif entry.count(":") == 1:
                host, _, port = entry.partition(":")
            else:
                host, port = entry, ""
            hosts.append(host)
            if port:
                ports[host] = int(port)
        resolver.nameservers = hosts
        resolver.nameserver_ports = ports
    resolver.lifetime = lifetime
    resolver.timeout = min(lifetime, 2.0)
    resolver.cache = dns.resolver.LRUCache(cache_size)
    return resolver
