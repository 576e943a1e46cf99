"""Which outbox rows a replayer drains: its own Redis's, under whatever spelling, and no one else's.

A row names its Redis as its producer spelled it (``target``): ``host:port/db``,
``unix:path/db``, ``sentinel:service/db``, or a name given with ``SPILLOVER_TARGET``. The
replayer decides, when it drains, which names are its own server:

- the same name; or, for ``host:port/db`` names with the same port and db, hosts that are
  the same server: both loopback (``localhost``, ``127.0.0.1``, ``::1``), or names whose
  addresses, resolved here and now, overlap (a short and a fully qualified service name,
  an alias). Sentinel names, and names given with ``SPILLOVER_TARGET`` that are not of the
  ``host:port/db`` form, match only exactly.
- **Loopback names and socket paths are host-local**: ``localhost`` on host A and on host B,
  writing into one shared Postgres outbox, are two servers. Rows with such a name are drained
  only by a replayer on the host their producer ran on (the host part of the row's
  ``producer``), each host's rows under a lease of their own.
- Rows with no target (written by 0.1 producers, or into a 0.1 schema) are adopted: 0.1 had one
  Redis per outbox (its replayer pushed every row into its own), so the outbox's replayer is
  theirs; but only while no replayer of another Redis runs on the outbox (registry.py), where
  nobody can tell whose they are. ``--no-adopt-untargeted`` leaves them to another replayer.

Names are resolved by the replayer, at the time it drains, never by a producer on its enqueue
path (a DNS lookup there could hang an enqueue). A producer qualifies a short host name with
its first DNS search domain (``redis`` in namespace ``shop`` of a Kubernetes cluster becomes
``redis.shop.svc.cluster.local``), because a short name means a different server in each
namespace, and the replayer resolving it would read it in its own.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import NamedTuple

from .errors import ConfigurationError
from .rq_keys import server_part, split_target

#: Host names that always mean this machine.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: Seconds a resolved host name is trusted.
RESOLVE_TTL = 30.0
#: The lease name of rows without a target.
UNTARGETED = "(untargeted)"


def this_host() -> str:
    """This machine's name as the ``producer`` column records it (its first 40 characters)."""
    return socket.gethostname()[:40]


class Address(NamedTuple):
    kind: str  # "tcp" or "unix"
    where: str  # host (lower-case, no brackets) or socket path
    port: int
    db: int


def parse(target: str) -> Address | None:
    """The address a derived target name stands for; None for names given by hand and Sentinel names."""
    name, _, db = target.rpartition("/")
    if not name or not db.isdigit():
        return None
    if name.startswith("unix:"):
        return Address("unix", os.path.normpath(name[len("unix:") :]), 0, int(db))
    host, _, port = name.rpartition(":")
    if not host or not port.isdigit() or host == "sentinel":
        return None
    return Address("tcp", host.strip("[]").lower(), int(port), int(db))


def _is_loopback_literal(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Resolver:
    """Host name to addresses, cached for RESOLVE_TTL; a name that does not resolve has none."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    def addresses(self, host: str) -> frozenset[str]:
        found = self._cache.get(host)
        if found is not None and time.monotonic() - found[0] < RESOLVE_TTL:
            return found[1]
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            addresses = frozenset(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos)
        except (OSError, ValueError, UnicodeError):
            addresses = frozenset()
        self._cache[host] = (time.monotonic(), addresses)
        return addresses

    def is_loopback(self, host: str) -> bool:
        """The name means this machine: literally, or every address it resolves to is loopback."""
        if _is_loopback_literal(host):
            return True
        found = self.addresses(host)
        return bool(found) and all(ipaddress.ip_address(a).is_loopback for a in found)


@dataclass(frozen=True)
class Group:
    """Pending rows drained together, in id order, under one lease: a target's queue, maybe one host's rows."""

    target: str | None
    queue: str
    host: str | None = None  # only rows whose producer ran on this host (host-local targets)

    @property
    def lease_name(self) -> str:
        name = UNTARGETED if self.target is None else self.target
        return name if self.host is None else f"{name}@{self.host}"


class TargetMatcher:
    """One replayer's view: which row targets are its own Redis."""

    def __init__(self, own: str, *, adopt_untargeted: bool = True, host: str | None = None) -> None:
        self.own = own
        self.adopt_untargeted = adopt_untargeted
        self.host = this_host() if host is None else host
        self._own = parse(own)
        self._resolver = _Resolver()

    def group(self, target: str | None, queue: str, row_host: str) -> Group | None:
        """The group this replayer drains such rows in, or None when they are not its own.

        A stored target may carry RQ's key prefix (rq_keys.stored_target): its rows are this
        replayer's if the Redis part is, drained in groups (and leases) of their own.
        """
        if target is None:
            return Group(None, queue) if self.adopt_untargeted else None
        try:
            server, _ = split_target(target)
        except ConfigurationError:
            return None  # not a prefix RQ accepts: nobody's rows (status lists them)
        if not self.same_server(server):
            return None
        if self.host_local(target):
            return Group(target, queue, row_host) if row_host == self.host else None
        return Group(target, queue)

    def host_local(self, target: str) -> bool:
        """Loopback and socket names mean a server on the producer's own host."""
        address = parse(server_part(target))
        if address is None:
            return False
        return address.kind == "unix" or self._resolver.is_loopback(address.where)

    def same_server(self, target: str) -> bool:
        if target == self.own:
            return True
        theirs, mine = parse(target), self._own
        if theirs is None or mine is None or theirs.kind != mine.kind or theirs.db != mine.db:
            return False
        if theirs.kind == "unix":
            return theirs.where == mine.where
        if theirs.port != mine.port:
            return False
        if theirs.where == mine.where or qualified_host(theirs.where) == qualified_host(mine.where):
            return True  # (a short name recorded before producers qualified it, in this host's domain)
        resolver = self._resolver
        if resolver.is_loopback(theirs.where) or resolver.is_loopback(mine.where):
            return resolver.is_loopback(theirs.where) and resolver.is_loopback(mine.where)
        return bool(resolver.addresses(theirs.where) & resolver.addresses(mine.where))


def is_host_local_name(target: str) -> bool:
    """A loopback or socket name, by its spelling alone (no lookup): for reports."""
    address = parse(server_part(target))
    return address is not None and (address.kind == "unix" or _is_loopback_literal(address.where))


def setting_for(group: Group) -> str:
    """The replayer setting that would drain ``group``'s rows, for ``status`` and warnings."""
    where = f" on host {group.host}" if group.host else ""
    if group.target is None:
        return (
            "one replayer alone on this outbox, of the Redis these rows were meant for (rows with no target are "
            f"adopted only while no replayer of another Redis runs){where}"
        )
    server = server_part(group.target)  # a replayer of that Redis drains its rows of every key prefix
    address = parse(server)
    if address is None:
        return f"a replayer with --target {server!r}{where}"
    if address.kind == "unix":
        return f"a replayer with --redis-url unix://{address.where}?db={address.db}{where}"
    host = f"[{address.where}]" if ":" in address.where else address.where
    return f"a replayer with --redis-url redis://{host}:{address.port}/{address.db}{where}"


@functools.cache
def search_domain() -> str | None:
    """The first DNS search domain of this host (/etc/resolv.conf), which resolves its short names."""
    try:
        with open("/etc/resolv.conf", encoding="utf-8") as conf:
            for line in conf:
                words = line.split()
                if len(words) >= 2 and words[0] in ("search", "domain"):
                    return words[1].rstrip(".").lower() or None
    except OSError:
        pass
    return None


def qualified_host(host: str) -> str:
    """A short host name with this host's first search domain; other names as they are."""
    if "." in host or ":" in host or _is_loopback_literal(host):
        return host
    domain = search_domain()
    return f"{host}.{domain}" if domain else host
