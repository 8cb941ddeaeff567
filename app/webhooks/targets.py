"""Where webhooks may go: `SGJOBS_WEBHOOK_ALLOWED_HOSTS`, checked at submit and again at each send.

A webhook makes the service send a request where a user says, from inside the operator's network:
without a bound, any member could make it reach internal services (SSRF). So only hosts the
operator names are allowed, matched exactly: `hooks.example.com` (any port), `hooks.example.com:8443`
(that port only), `10.0.0.7`, `[fd00::7]:9000`. `*` allows any host whose every address is public.

At each send the URL is checked against the settings of that moment, its host is resolved once, and
the request goes to the address that was checked (no second lookup an attacker's DNS could answer
differently). A host allowed by name may resolve to private or loopback addresses (an internal
receiver is the common case), never to link-local, multicast or unspecified ones (169.254.169.254
is a cloud's metadata service: an allowed name whose DNS turns to it is a trick). Redirects are
never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.settings import Settings

ANY_PUBLIC_HOST = "*"
SETTING = "SGJOBS_WEBHOOK_ALLOWED_HOSTS"
DEFAULT_PORTS = {"http": 80, "https": 443}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(ValueError):
    """The URL may not be used now; the message says why and what to change."""


@dataclass(frozen=True)
class Target:
    """A checked URL: its host and port, and the address the request must connect to."""

    url: str
    host: str
    port: int
    address: str


def _split(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise Refused(f"a webhook URL must be http:// or https://, not {parts.scheme or 'nothing'}")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise Refused("the webhook URL has no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise Refused(f"the webhook URL's port is not valid: {exc}") from exc
    return scheme, host, port


def _ip(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _entry(host: str, port: int) -> tuple[str, str]:
    """How an allow-list entry names this host: bare, and with its port (`[v6]:port` for IPv6)."""
    return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _named(settings: Settings, host: str, port: int) -> bool:
    bare, with_port = _entry(host, port)
    allowed = settings.webhook_allowed_hosts
    return bare in allowed or with_port in allowed or (_ip(host) is not None and f"[{host}]" in allowed)


def _refusal(host: str, port: int) -> Refused:
    bare, with_port = _entry(host, port)
    return Refused(
        f"webhooks may not be sent to {with_port}: the host is not in {SETTING} on this server "
        f"(ask its operator to add {bare!r} or {with_port!r})"
    )


def check_url(settings: Settings, url: str) -> None:
    """At submit: the URL's host is allowed (no DNS lookup; `check_target` does it when sending)."""
    _, host, port = _split(url)
    if _named(settings, host, port):
        return
    address = _ip(host)
    if ANY_PUBLIC_HOST in settings.webhook_allowed_hosts and (address is None or address.is_global):
        return
    raise _refusal(host, port)


def _acceptable(address: Address, *, named: bool) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not named:
        return address.is_global
    return not (
        address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved
    )


def resolve(host: str, port: int) -> list[Address]:
    """Every address of `host` (the system resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def check_target(settings: Settings, url: str) -> Target:
    """At each send: the URL allowed by the settings of now, and the checked address to connect to.
    `Refused` when it is not allowed (any more) or its host resolves where it may not go; OSError
    when the lookup fails."""
    _, host, port = _split(url)
    named = _named(settings, host, port)
    if not named and ANY_PUBLIC_HOST not in settings.webhook_allowed_hosts:
        raise _refusal(host, port)
    literal = _ip(host)
    if literal is not None and named:
        # The operator named this very address.
        return Target(url=url, host=host, port=port, address=str(literal))
    # A lookup that fails raises OSError: a passing DNS problem, worth another attempt.
    addresses = [literal] if literal is not None else resolve(host, port)
    bad = [str(a) for a in addresses if not _acceptable(a, named=named)]
    if bad or not addresses:
        kind = "an allowed name" if named else f"allowed by {ANY_PUBLIC_HOST!r} (public addresses only)"
        raise Refused(f"the webhook host {host} is {kind} but resolves to {', '.join(bad) or 'nothing'}")
    return Target(url=url, host=host, port=port, address=str(addresses[0]))
