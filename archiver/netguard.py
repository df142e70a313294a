"""Where download requests may go.

A ``download_url`` comes from outside (the listing, a retrieve, a download host's redirect), so
archiver checks it twice before any byte is fetched:

* its **shape**, statically (``check_download_url``): http(s), a host, no userinfo, at most
  8 KiB, no control character or whitespace, no numeric host that is not a canonical address;
* its **destination**, at the moment of connecting, on the address actually used
  (``DownloadPolicy``): never loopback, link-local, private, CGNAT, unspecified, multicast,
  broadcast or reserved addresses (nor their IPv4-mapped, NAT64 or 6to4 forms), never a cloud
  metadata address, never the API's own origin.

Two exemptions: when ``telnyx.base_url`` is itself on a loopback, private, CGNAT or link-local
address (the simulator, a private gateway), downloads may use that same class of address; and
``telnyx.allow_private_download_hosts = true`` allows all four classes. Metadata, unspecified,
multicast, broadcast and reserved addresses, and the API's origin, are refused whatever the
settings say.

Host names are checked by a resolver wrapped around aiohttp's own (``download_connector``), so
what is checked is what is connected to and a name that changes its answer (DNS rebinding)
cannot slip through; aiohttp does not resolve IP literals, so ``open_download`` checks those
before each request. ``open_download`` also follows redirects itself, putting every hop through
the same checks. A refusal raises ``RefusedDestination`` (transient: a fresh URL may do).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ssl import SSLContext
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from archiver.config import TelnyxSettings
from archiver.errors import RefusedDestination, UnsafeValue
from archiver.redact import safe_url

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_BYTES = 8 * 1024
MAX_REDIRECTS = 5

# Control characters (C0, DEL, C1) and any Unicode whitespace: never part of a real URL, and
# the classic way to make two parsers disagree about where the host ends.
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
# A last label like "1", "0x7f" or "017": not a DNS name but an inet_aton() spelling of an
# address, which some resolvers turn into one.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+", re.IGNORECASE)
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_API_LOOKUP_SECONDS = 300.0


class AddressClass(enum.StrEnum):
    """Where an address leads. Only ``PUBLIC`` (globally reachable, IANA) is always allowed."""

    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    SHARED = "shared (CGNAT)"
    LINK_LOCAL = "link-local"
    METADATA = "cloud metadata"
    UNSPECIFIED = "unspecified"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    RESERVED = "reserved"


# The classes an exemption can open; everything else but PUBLIC is refused always.
_EXEMPTABLE = frozenset(
    {AddressClass.LOOPBACK, AddressClass.PRIVATE, AddressClass.SHARED, AddressClass.LINK_LOCAL}
)

# Instance metadata and host agents of the clouds: the credentials behind them are the prize of
# a request forgery, so no setting opens them.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, ...
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS Pod Identity
        "169.254.0.23",  # Tencent Cloud
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer (a public address, Azure-internal)
        "192.0.0.192",  # Oracle Cloud Classic
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS Pod Identity over IPv6
    )
)


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*pairs: tuple[str, AddressClass]) -> tuple[tuple[_Network, AddressClass], ...]:
    return tuple((ipaddress.ip_network(net), cls) for net, cls in pairs)


# From the IANA special-purpose address registries: what is not globally reachable. More
# specific networks first.
_V4 = _nets(
    ("0.0.0.0/8", AddressClass.UNSPECIFIED),
    ("10.0.0.0/8", AddressClass.PRIVATE),
    ("100.64.0.0/10", AddressClass.SHARED),
    ("127.0.0.0/8", AddressClass.LOOPBACK),
    ("169.254.0.0/16", AddressClass.LINK_LOCAL),
    ("172.16.0.0/12", AddressClass.PRIVATE),
    ("192.0.0.0/24", AddressClass.RESERVED),
    ("192.0.2.0/24", AddressClass.RESERVED),
    ("192.88.99.0/24", AddressClass.RESERVED),
    ("192.168.0.0/16", AddressClass.PRIVATE),
    ("198.18.0.0/15", AddressClass.RESERVED),
    ("198.51.100.0/24", AddressClass.RESERVED),
    ("203.0.113.0/24", AddressClass.RESERVED),
    ("224.0.0.0/4", AddressClass.MULTICAST),
    ("255.255.255.255/32", AddressClass.BROADCAST),
    ("240.0.0.0/4", AddressClass.RESERVED),
)
_V6 = _nets(
    ("::/128", AddressClass.UNSPECIFIED),
    ("::1/128", AddressClass.LOOPBACK),
    ("100::/64", AddressClass.RESERVED),
    ("2001::/23", AddressClass.RESERVED),  # Teredo, ORCHID, benchmarking, ...
    ("2001:db8::/32", AddressClass.RESERVED),
    ("3fff::/20", AddressClass.RESERVED),
    ("5f00::/16", AddressClass.RESERVED),
    ("fc00::/7", AddressClass.PRIVATE),
    ("fe80::/10", AddressClass.LINK_LOCAL),
    ("fec0::/10", AddressClass.PRIVATE),  # site-local, deprecated
    ("ff00::/8", AddressClass.MULTICAST),
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


@functools.lru_cache(maxsize=4096)
def classify(address: IPAddress | str) -> AddressClass:
    """The class of one address; embedded IPv4 (mapped, NAT64, 6to4) counts as itself."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(int(ip))  # without a scope id
    if ip in _METADATA:
        return AddressClass.METADATA
    if isinstance(ip, ipaddress.IPv4Address):
        return next((cls for net, cls in _V4 if ip in net), AddressClass.PUBLIC)
    embedded = ip.ipv4_mapped if ip.ipv4_mapped is not None else ip.sixtofour
    if embedded is None and (ip in _NAT64 or ip in _NAT64_LOCAL):
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if embedded is not None:
        cls = classify(embedded)
        # A local-use NAT64 prefix is a private translator, whatever it translates to.
        return AddressClass.PRIVATE if cls is AddressClass.PUBLIC and ip in _NAT64_LOCAL else cls
    for net, cls in _V6:
        if ip in net:
            return cls
    return AddressClass.PUBLIC if ip in _GLOBAL_UNICAST else AddressClass.RESERVED


@functools.lru_cache(maxsize=4096)
def ip_literal(host: str | None) -> IPAddress | None:
    """The address a URL's host spells, or None for a name."""
    if not host:
        return None
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Origin:
    """Scheme, host and port of a URL (the port made explicit)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: URL | str) -> Origin:
        parsed = url if isinstance(url, URL) else URL(url)
        host = (parsed.raw_host or "").lower().rstrip(".")
        literal = ip_literal(host)
        if literal is not None:
            host = str(literal)
        return cls(parsed.scheme.lower(), host, parsed.port or 0)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


# -- the static check ------------------------------------------------------------------------


def check_download_url(url: str) -> str:
    """Refuse (``UnsafeValue``) a URL of the wrong shape; return it unchanged when it is fine.
    Says nothing of where it leads: that is ``DownloadPolicy``'s part, at connection time."""
    _parsed_download_url(url)
    return url


def _parsed_download_url(url: str) -> URL:
    """``check_download_url``, giving the URL as parsed for the request."""
    problem, parsed = _shape(url)
    if parsed is None:
        raise UnsafeValue(f"download_url {problem}")
    return parsed


def _shape(url: object) -> tuple[str | None, URL | None]:
    """(why the URL is refused, None) or (None, the parsed URL aiohttp will request)."""
    if not isinstance(url, str):
        return f"is a {type(url).__name__}, not a string", None
    size = len(url.encode("utf-8", "surrogatepass"))
    if size > MAX_URL_BYTES:
        return f"is {size} bytes long, more than {MAX_URL_BYTES}", None
    if _FORBIDDEN_CHARS.search(url):
        return "contains a control character or whitespace", None
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 - an out-of-range port raises here
    except ValueError as exc:
        return f"cannot be parsed ({exc})", None
    if parsed.scheme not in ("http", "https"):
        return f"scheme {parsed.scheme or '(none)'!r} is not http(s)", None
    host = parsed.raw_host
    if not host:
        return "has no host", None
    # A second parser's view too, where two could disagree about where the host starts.
    if (
        parsed.raw_user is not None
        or parsed.raw_password is not None
        or ("@" in url and "@" in _netloc(url))
    ):
        return "carries credentials (userinfo before the host); archiver never sends them", None
    literal = ip_literal(host)
    # aiohttp treats a host with a colon or only digits and dots as an address without asking
    # the resolver: such a host must be one, spelled canonically.
    looks_numeric = ":" in host or host.replace(".", "").isdigit()
    last_label = host.rstrip(".").rsplit(".", 1)[-1]
    if literal is None and (looks_numeric or _NUMERIC_LABEL.fullmatch(last_label)):
        return f"host {host[:80]!r} is neither a name nor a canonical IP address", None
    return None, parsed


def _netloc(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:
        return ""


def _shown(url: URL) -> str:
    """A URL for an error message: no credentials, no query (presigned signatures), no
    fragment."""
    return safe_url(str(url.with_user(None).with_query(None).with_fragment(None)))


# -- the policy ------------------------------------------------------------------------------


class _ApiAddresses:
    """The API host's addresses: its literal, or its name looked up when first needed and kept
    for five minutes (a failed lookup is not kept, and exempts nothing)."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        literal = ip_literal(host)
        self._fixed = frozenset({literal}) if literal is not None else None
        self._cached: frozenset[IPAddress] = frozenset()
        self._until = 0.0

    async def get(self) -> frozenset[IPAddress]:
        if self._fixed is not None:
            return self._fixed
        if time.monotonic() < self._until:
            return self._cached
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM
            )
        except OSError:
            return frozenset()
        found = {ip_literal(str(info[4][0])) for info in infos}
        self._cached = frozenset(a for a in found if a is not None)
        self._until = time.monotonic() + _API_LOOKUP_SECONDS
        return self._cached


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """Which destinations a download may connect to. Build it with ``from_settings``."""

    api_origin: Origin
    allow_private: bool = False
    _api: _ApiAddresses = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        api = _ApiAddresses(self.api_origin.host, self.api_origin.port)
        object.__setattr__(self, "_api", api)

    @classmethod
    def from_settings(cls, telnyx: TelnyxSettings) -> DownloadPolicy:
        """The policy for ``telnyx.base_url`` and ``telnyx.allow_private_download_hosts``. Makes
        no connection and no lookup: an API host name is looked up only when a download leads
        to a non-public address."""
        return cls(
            api_origin=Origin.of(telnyx.base_url),
            allow_private=telnyx.allow_private_download_hosts,
        )

    def check_origin(self, url: URL) -> None:
        """Refuse the API's own origin: it never serves recordings (whatever it echoes)."""
        if Origin.of(url) == self.api_origin:
            raise RefusedDestination(
                f"refusing to download from {_shown(url)}: it is the Telnyx API's own "
                f"origin ({self.api_origin}), which never serves recordings"
            )

    async def refusal(self, address: IPAddress, port: int) -> str | None:
        """Why a connection to ``address``:``port`` is refused, or None when it is allowed."""
        cls = classify(address)
        if cls is AddressClass.PUBLIC:
            return None
        if cls not in _EXEMPTABLE:
            return f"{address} is a {cls} address, where archiver never connects"
        api = await self._api.get()
        # One loopback interface is one host: any loopback address on the API's port is the
        # API (a server listening on all addresses answers there too).
        if port == self.api_origin.port and (
            address in api or (cls is AddressClass.LOOPBACK and any(a.is_loopback for a in api))
        ):
            return f"{address} port {port} is the Telnyx API itself, which never serves recordings"
        if self.allow_private or cls in {classify(a) for a in api}:
            return None
        return (
            f"{address} is a {cls} address and the Telnyx API is not "
            "(set telnyx.allow_private_download_hosts = true to allow such hosts)"
        )

    async def check_literal(self, url: URL) -> None:
        """Refuse a URL whose host is an address the policy forbids, before any connection:
        aiohttp connects to literals without asking the resolver."""
        literal = ip_literal(url.raw_host)
        if literal is None:
            return
        reason = await self.refusal(literal, url.port or 0)
        if reason is not None:
            raise RefusedDestination(f"refusing to download from {_shown(url)}: {reason}")


# -- connecting ------------------------------------------------------------------------------


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver with the policy applied to every answer: forbidden addresses are
    dropped, and a name left with none is refused."""

    def __init__(self, policy: DownloadPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        reasons: list[str] = []
        for answer in answers:
            address = ip_literal(answer["host"])
            reason = (
                f"{answer['host']!r} is not an address"
                if address is None
                else await self._policy.refusal(address, port)
            )
            if reason is None:
                allowed.append(answer)
            else:
                reasons.append(reason)
        if not allowed:
            why = reasons[0] if reasons else "no address at all"
            raise RefusedDestination(f"refusing to connect to download host {host}: {why}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector whose every name lookup goes through the policy."""

    def __init__(
        self,
        policy: DownloadPolicy,
        *,
        resolver: AbstractResolver | None = None,
        ssl: SSLContext | bool = True,
        limit: int = 0,
        limit_per_host: int = 0,
        ttl_dns_cache: int = 300,
    ) -> None:
        self.policy = policy
        self._guard = GuardedResolver(policy, resolver)
        super().__init__(
            resolver=self._guard,
            ssl=ssl,
            limit=limit,
            limit_per_host=limit_per_host,
            ttl_dns_cache=ttl_dns_cache,
        )

    async def close(self, *, abort_ssl: bool = False) -> None:
        try:
            await super().close(abort_ssl=abort_ssl)
        finally:
            await self._guard.close()


def download_connector(
    policy: DownloadPolicy,
    *,
    resolver: AbstractResolver | None = None,
    ssl: SSLContext | bool = True,
) -> aiohttp.TCPConnector:
    """The connector for the download session: no connection limit of its own (the transfer's
    download slots bound them), lookups cached five minutes (only allowed answers are
    cached), every answer checked. ``resolver`` replaces aiohttp's default one underneath the
    guard (e.g. aiodns); ``ssl`` as for ``aiohttp.TCPConnector`` (e.g. a private CA)."""
    return GuardedConnector(policy, resolver=resolver, ssl=ssl)


@asynccontextmanager
async def open_download(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str],
    policy: DownloadPolicy,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url`` through the policy and yield the final response, whatever its status.

    Redirects (301/302/303/307/308 with a Location) are followed here, at most
    ``MAX_REDIRECTS`` of them, each target checked like the first URL (shape, API origin,
    literal addresses; names by the connector's resolver) and never from https down to http;
    their bodies are not read. ``headers`` go to every hop: put no secret in them. ``session``
    must use ``download_connector(policy)``, or host names would go unchecked.
    """
    current = _parsed_download_url(url)
    connector = session.connector
    if not isinstance(connector, GuardedConnector) or connector.policy != policy:
        raise TypeError("open_download needs a session made with download_connector(policy)")
    policy.check_origin(current)
    redirects = 0
    while True:
        await policy.check_literal(current)
        async with session.get(current, headers=headers, allow_redirects=False) as resp:
            location = resp.headers.get(aiohttp.hdrs.LOCATION)
            if log.isEnabledFor(logging.DEBUG):  # the shown URL costs more than the line
                log.debug(
                    "download GET %s%s: HTTP %d",
                    _shown(current),
                    f" (Range {headers['Range']})" if "Range" in headers else "",
                    resp.status,
                )
            if resp.status not in _REDIRECT_STATUSES or location is None:
                yield resp
                return
        if redirects == MAX_REDIRECTS:
            raise RefusedDestination(
                f"refusing to follow more than {MAX_REDIRECTS} redirects from {_shown(current)}"
            )
        redirects += 1
        current = _next_hop(current, location, policy)


def _next_hop(current: URL, location: str, policy: DownloadPolicy) -> URL:
    where = _shown(current)
    target: URL | None = None
    # Checked raw: joining would percent-encode a space and hide it. (aiohttp refuses a
    # header over 8 KiB itself; the joined URL's size is checked below.)
    if _FORBIDDEN_CHARS.search(location):
        problem: str | None = "contains a control character or whitespace"
    else:
        try:
            joined = current.join(URL(location)).with_fragment(None)
        except ValueError as exc:
            problem = f"cannot be parsed ({exc})"
        else:
            problem, target = _shape(str(joined))
    if problem is not None or target is None:
        raise RefusedDestination(f"refusing the redirect from {where}: its target {problem}")
    if current.scheme == "https" and target.scheme == "http":
        raise RefusedDestination(
            f"refusing the redirect from {where} to {_shown(target)}: https must not become http"
        )
    policy.check_origin(target)
    return target
