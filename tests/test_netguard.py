"""Where requests go: the download network policy (archiver.netguard) and the API client's
redirect and size rules, against real aiohttp servers on 127.0.0.1.

Every server logs the requests it receives, so "nothing forbidden was requested" is read from
the server side; a trace on the client session shows which requests were even started.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from archiver import layout, netguard
from archiver.config import Secret, TelnyxSettings, load_settings
from archiver.errors import ApiError, MalformedResponse, RefusedDestination, UnsafeValue
from archiver.filters import Filters
from archiver.models import MalformedEntry, Recording
from archiver.netguard import AddressClass, DownloadPolicy, Origin, classify, open_download
from archiver.telnyx import MAX_RESPONSE_BYTES, TelnyxClient, parse_page

API_KEY = "KEYnetguard0123456789SECRET"
GOOD_ID = "6b61621f-62e0-4aad-ab11-9fd19e272e73"
MiB = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[..., Awaitable["Server"]]


# -- servers on loopback ---------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]


@dataclass
class Server:
    url: str
    port: int
    log: list[Seen] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [s.path_qs for s in self.log]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a server answering every path with ``handler``; all are stopped after the test."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler, *, tls: ssl.SSLContext | None = None) -> Server:
        server: Server | None = None

        async def logged(request: web.Request) -> web.StreamResponse:
            assert server is not None
            server.log.append(Seen(request.method, request.path_qs, dict(request.headers)))
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", logged)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        port = runner.addresses[0][1]
        server = Server(url=f"{'https' if tls else 'http'}://127.0.0.1:{port}", port=port)
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


async def ok(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"recording bytes", content_type="video/mp4")


def redirect_to(location: str, status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location}, text="moved")

    return handler


def routes(table: dict[str, Handler]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        for prefix, answer in table.items():
            if request.path.startswith(prefix):
                return await answer(request)
        return web.Response(status=404)

    return handler


@dataclass
class Client:
    session: aiohttp.ClientSession
    started: list[str]  # URLs of every request the session started


@asynccontextmanager
async def download_client(policy: DownloadPolicy, **connector: Any) -> AsyncIterator[Client]:
    started: list[str] = []

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        started.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    session = aiohttp.ClientSession(
        connector=netguard.download_connector(policy, **connector), trace_configs=[trace]
    )
    async with session:
        yield Client(session, started)


def policy_for(base_url: str, *, allow_private: bool = False) -> DownloadPolicy:
    return DownloadPolicy.from_settings(
        TelnyxSettings(base_url=base_url, allow_private_download_hosts=allow_private)
    )


# -- address classes and the policy table ----------------------------------------------------
@pytest.mark.parametrize(
    "address,expected",
    [
        ("8.8.8.8", AddressClass.PUBLIC),
        ("2606:4700:4700::1111", AddressClass.PUBLIC),
        ("100.63.255.255", AddressClass.PUBLIC),
        ("100.128.0.1", AddressClass.PUBLIC),
        ("172.15.255.255", AddressClass.PUBLIC),
        ("172.32.0.1", AddressClass.PUBLIC),
        ("64:ff9b::808:808", AddressClass.PUBLIC),  # NAT64 of a public address
        ("127.0.0.1", AddressClass.LOOPBACK),
        ("127.255.0.9", AddressClass.LOOPBACK),
        ("::1", AddressClass.LOOPBACK),
        ("10.1.2.3", AddressClass.PRIVATE),
        ("172.16.0.1", AddressClass.PRIVATE),
        ("172.31.255.255", AddressClass.PRIVATE),
        ("192.168.1.1", AddressClass.PRIVATE),
        ("fc00::1", AddressClass.PRIVATE),
        ("fd12:3456::1", AddressClass.PRIVATE),
        ("64:ff9b:1::808:808", AddressClass.PRIVATE),  # local-use NAT64
        ("100.64.0.1", AddressClass.SHARED),
        ("100.127.255.254", AddressClass.SHARED),
        ("169.254.1.1", AddressClass.LINK_LOCAL),
        ("fe80::1", AddressClass.LINK_LOCAL),
        ("fe80::1%eth0", AddressClass.LINK_LOCAL),
        ("169.254.169.254", AddressClass.METADATA),
        ("169.254.170.2", AddressClass.METADATA),
        ("fd00:ec2::254", AddressClass.METADATA),
        ("fd00:ec2::254%eth0", AddressClass.METADATA),
        ("100.100.100.200", AddressClass.METADATA),
        ("0.0.0.0", AddressClass.UNSPECIFIED),
        ("0.1.2.3", AddressClass.UNSPECIFIED),
        ("::", AddressClass.UNSPECIFIED),
        ("224.0.0.1", AddressClass.MULTICAST),
        ("239.255.255.250", AddressClass.MULTICAST),
        ("ff02::1", AddressClass.MULTICAST),
        ("255.255.255.255", AddressClass.BROADCAST),
        ("240.0.0.1", AddressClass.RESERVED),
        ("192.0.2.1", AddressClass.RESERVED),
        ("203.0.113.10", AddressClass.RESERVED),
        ("2001:db8::1", AddressClass.RESERVED),
        ("2001::1", AddressClass.RESERVED),  # Teredo
        ("4000::1", AddressClass.RESERVED),  # outside global unicast
        # IPv4 inside IPv6 counts as itself.
        ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
        ("::ffff:10.0.0.1", AddressClass.PRIVATE),
        ("::ffff:169.254.169.254", AddressClass.METADATA),
        ("64:ff9b::7f00:1", AddressClass.LOOPBACK),
        ("64:ff9b::a9fe:a9fe", AddressClass.METADATA),
        ("2002:a9fe:a9fe::1", AddressClass.METADATA),  # 6to4
        ("2002:c0a8:101::1", AddressClass.PRIVATE),
    ],
)
def test_address_classes(address: str, expected: AddressClass) -> None:
    assert classify(address) is expected


REFUSED_EVERYWHERE = [
    "169.254.169.254",
    "169.254.170.2",
    "100.100.100.200",
    "fd00:ec2::254",
    "::ffff:169.254.169.254",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
]
PRIVATE_KINDS = [
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "10.0.0.1",
    "172.16.5.5",
    "192.168.0.10",
    "fd00::1",
    "100.64.0.1",
    "169.254.1.1",
    "fe80::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"]


async def refused(policy: DownloadPolicy, address: str, port: int = 443) -> str | None:
    return await policy.refusal(ipaddress.ip_address(address), port)


@pytest.mark.parametrize("api", ["https://203.0.113.10/v2", "https://1.1.1.1/v2"])
async def test_with_a_public_api_only_public_addresses_are_allowed(api: str) -> None:
    policy = policy_for(api)
    for address in REFUSED_EVERYWHERE + PRIVATE_KINDS:
        reason = await refused(policy, address)
        assert reason is not None and str(ipaddress.ip_address(address)) in reason, address
    for address in PUBLIC:
        assert await refused(policy, address) is None, address


async def test_a_loopback_api_exempts_loopback_only() -> None:
    policy = policy_for("http://127.0.0.1:8080/v2")
    for address in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
        assert await refused(policy, address, 9000) is None, address
    for address in ("10.0.0.1", "192.168.0.1", "100.64.0.1", "169.254.1.1", *REFUSED_EVERYWHERE):
        assert await refused(policy, address, 9000), address
    # The API's own port on loopback is the API, whatever loopback address spells it.
    for address in ("127.0.0.1", "127.0.0.5", "::1"):
        assert "Telnyx API itself" in (await refused(policy, address, 8080) or ""), address
    assert "allow_private_download_hosts" in (await refused(policy, "10.0.0.1") or "")


async def test_an_api_host_name_is_looked_up_for_its_class() -> None:
    # "localhost" comes from the hosts file: no network.
    policy = policy_for("http://localhost:8080/v2")
    assert await refused(policy, "127.0.0.1", 9000) is None
    assert "Telnyx API itself" in (await refused(policy, "127.0.0.1", 8080) or "")
    assert await refused(policy, "10.0.0.1", 9000)


async def test_a_private_api_exempts_private_addresses_never_metadata() -> None:
    policy = policy_for("https://10.20.30.40/v2")
    for address in ("10.9.9.9", "192.168.1.1", "172.20.0.1", "fd00::5"):
        assert await refused(policy, address) is None, address
    for address in ("127.0.0.1", "100.64.0.1", "169.254.1.1", *REFUSED_EVERYWHERE):
        assert await refused(policy, address), address
    assert "Telnyx API itself" in (await refused(policy, "10.20.30.40", 443) or "")
    assert await refused(policy, "10.20.30.40", 8443) is None


async def test_a_link_local_api_never_exempts_metadata() -> None:
    policy = policy_for("http://169.254.10.10/v2")
    assert await refused(policy, "169.254.1.1") is None
    assert "metadata" in (await refused(policy, "169.254.169.254") or "")


async def test_the_allow_flag_opens_private_kinds_never_metadata() -> None:
    policy = policy_for("https://1.1.1.1/v2", allow_private=True)
    for address in PRIVATE_KINDS:
        assert await refused(policy, address) is None, address
    for address in REFUSED_EVERYWHERE:
        assert await refused(policy, address), address
    loopback_api = policy_for("http://127.0.0.1:8080/v2", allow_private=True)
    assert await refused(loopback_api, "127.0.0.1", 8080)


def test_the_allow_flag_is_a_config_key(tmp_path: Path) -> None:
    default = load_settings(env={}, read_files=False)
    assert default.telnyx.allow_private_download_hosts is False
    config = tmp_path / "archiver.toml"
    config.write_text("[telnyx]\nallow_private_download_hosts = true\n")
    settings = load_settings(str(config), env={})
    assert DownloadPolicy.from_settings(settings.telnyx).allow_private
    config.write_text('[telnyx]\nallow_private_download_hosts = "yes"\n')
    with pytest.raises(Exception, match=r"telnyx\.allow_private_download_hosts"):
        load_settings(str(config), env={})


def test_origin_makes_the_port_explicit() -> None:
    assert Origin.of("https://API.example./v2") == Origin.of("https://api.example:443/x")
    assert Origin.of("http://[0:0::1]:80/") == Origin.of("http://[::1]/")
    assert Origin.of("http://h/") != Origin.of("https://h/")
    assert str(Origin.of("http://[::1]/")) == "http://[::1]:80"


# -- the static check ------------------------------------------------------------------------
STATICALLY_REFUSED = [
    "http://user:hunter2@h/x",
    "http://user@h/x",
    "http://@h/x",
    "https://u:hunter2@127.0.0.1:1/",
    "file:///etc/passwd",
    "ftp://h/x",
    "gopher://h/",
    "javascript:alert(1)",
    "data:text/plain,hi",
    "http:///nohost",
    "//h/x",
    "h/x",
    "",
    "https://h/" + "a" * (9 * 1024),
    "https://h/a b",
    "https://h/a\tb",
    "https://h/a\nHost: evil",
    "https://h/\x00",
    "https://h/\x7f",
    "https://h/\u2028",
    "https://h\u3000x/",
    "http://2130706433/",
    "http://127.1/",
    "http://0x7f.0.0.1/",
    "http://017700000001/",
    "http://h.0x7f/",
    "http://h:99999/",
    "http://[::1/",
]


@pytest.mark.parametrize("url", STATICALLY_REFUSED)
def test_urls_of_the_wrong_shape_are_refused(url: str) -> None:
    with pytest.raises(UnsafeValue) as caught:
        netguard.check_download_url(url)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(UnsafeValue):
        layout.check_download_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://h/x?y=1",
        "https://recordings.example/a/b.mp4?X-Amz-Signature=abc&X-Amz-Expires=60",
        "http://127.0.0.1:8080/x",
        "https://[2606:4700::1]/x",
        "https://bücher.example/x",
        "https://h/" + "a" * (8 * 1024 - len("https://h/")),  # exactly 8 KiB
    ],
)
def test_urls_of_the_right_shape_pass_unchanged(url: str) -> None:
    assert netguard.check_download_url(url) == url
    assert layout.check_download_url(url) == url


# -- open_download: redirects ----------------------------------------------------------------
async def test_a_redirect_on_the_same_host_is_followed(serve: Serve) -> None:
    api = await serve(ok)
    dl = await serve(
        routes(
            {
                "/start": redirect_to("/final?sig=2"),
                "/again": redirect_to("/final", status=307),
                "/final": ok,
            }
        )
    )
    policy = policy_for(f"{api.url}/v2")
    async with download_client(policy) as client:
        headers = {"Range": "bytes=5-", "Accept-Encoding": "identity"}
        url = f"{dl.url}/start?X-Sig=secret"
        async with open_download(client.session, url, headers=headers, policy=policy) as resp:
            assert resp.status == 200
            assert await resp.read() == b"recording bytes"
        async with open_download(
            client.session, f"{dl.url}/again", headers={}, policy=policy
        ) as resp:
            assert resp.status == 200
    assert dl.paths == ["/start?X-Sig=secret", "/final?sig=2", "/again", "/final"]
    assert dl.log[1].headers["Range"] == "bytes=5-"  # a resume survives the redirect
    assert api.log == []


async def test_other_statuses_are_passed_through(serve: Serve) -> None:
    api = await serve(ok)

    async def gone(request: web.Request) -> web.StreamResponse:
        return web.Response(status=403 if request.path == "/403" else 304)

    dl = await serve(gone)
    policy = policy_for(f"{api.url}/v2")
    async with download_client(policy) as client:
        for path, status in (("/403", 403), ("/304", 304)):
            async with open_download(
                client.session, dl.url + path, headers={}, policy=policy
            ) as resp:
                assert resp.status == status


async def refusal_of(client: Client, url: str, policy: DownloadPolicy) -> str:
    with pytest.raises(RefusedDestination) as caught:
        async with open_download(client.session, url, headers={}, policy=policy):
            pytest.fail("a refused download yielded a response")
    return str(caught.value)


async def test_a_redirect_to_the_metadata_address_is_refused_before_connecting(
    serve: Serve,
) -> None:
    api = await serve(ok)
    dl = await serve(redirect_to("http://169.254.169.254/latest/meta-data/"))
    for policy in (policy_for(f"{api.url}/v2"), policy_for(f"{api.url}/v2", allow_private=True)):
        async with download_client(policy) as client:
            message = await refusal_of(client, f"{dl.url}/start?X-Sig=secret", policy)
            # The only request started was the first one: none towards 169.254.169.254.
            assert client.started == [f"{dl.url}/start?X-Sig=secret"]
        assert "169.254.169.254" in message and "metadata" in message
        assert "secret" not in message
    assert dl.paths == ["/start?X-Sig=secret"] * 2


async def test_a_redirect_with_credentials_is_refused(serve: Serve) -> None:
    api = await serve(ok)
    other = await serve(ok)
    dl = await serve(redirect_to(f"http://user:hunter2@127.0.0.1:{other.port}/x"))
    policy = policy_for(f"{api.url}/v2")
    async with download_client(policy) as client:
        message = await refusal_of(client, f"{dl.url}/start", policy)
        assert client.started == [f"{dl.url}/start"]
    assert "credentials" in message and "hunter2" not in message
    assert other.log == [] and dl.paths == ["/start"]


async def test_a_redirect_of_the_wrong_shape_is_refused(serve: Serve) -> None:
    api = await serve(ok)
    dl = await serve(
        routes(
            {
                "/space": redirect_to("/fin al"),
                "/long/": redirect_to("b" * 5000),  # relative: 10 KB once joined
                "/file": redirect_to("file:///etc/passwd"),
                "/final": ok,
            }
        )
    )
    policy = policy_for(f"{api.url}/v2")
    async with download_client(policy) as client:
        for path, why in (
            ("/space", "whitespace"),
            ("/long/" + "a" * 5000 + "/", "bytes long"),
            ("/file", "not http(s)"),
        ):
            assert why in await refusal_of(client, dl.url + path, policy), path
    assert dl.paths == ["/space", "/long/" + "a" * 5000 + "/", "/file"]


async def test_a_redirect_to_the_api_is_refused_however_spelled(serve: Serve) -> None:
    api = await serve(ok)
    policy = policy_for(f"{api.url}/v2")
    # By origin, statically; and by address at connection time, for an alias of the API.
    for target, rule in (
        (f"{api.url}/echo", "own origin"),
        (f"http://localhost:{api.port}/echo", "Telnyx API itself"),
    ):
        dl = await serve(redirect_to(target))
        async with download_client(policy) as client:
            message = await refusal_of(client, f"{dl.url}/start", policy)
        assert rule in message, target
    async with download_client(policy) as client:
        message = await refusal_of(client, f"{api.url}/echo", policy)
        assert client.started == []
    assert "own origin" in message
    assert api.log == []


async def test_a_downgrade_to_http_is_refused(serve: Serve, tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    api = await serve(ok)
    plain = await serve(ok)
    tls = await serve(
        routes(
            {
                "/down": redirect_to(f"http://127.0.0.1:{plain.port}/final"),
                "/same": redirect_to("/final"),
                "/final": ok,
            }
        ),
        tls=server_tls,
    )
    policy = policy_for(f"{api.url}/v2")
    async with download_client(policy, ssl=client_tls) as client:
        async with open_download(client.session, f"{tls.url}/same", headers={}, policy=policy) as r:
            assert r.status == 200
        message = await refusal_of(client, f"{tls.url}/down", policy)
    assert "https must not become http" in message
    assert plain.log == [] and tls.paths == ["/same", "/final", "/down"]


async def test_at_most_five_redirects_are_followed(serve: Serve) -> None:
    api = await serve(ok)

    async def chain(request: web.Request) -> web.StreamResponse:
        _, name, number = request.path.split("/")
        length, hop = int(name.removeprefix("chain")), int(number)
        if hop < length:
            return web.Response(status=302, headers={"Location": f"/{name}/{hop + 1}"})
        return await ok(request)

    dl = await serve(chain)
    policy = policy_for(f"{api.url}/v2")
    async with download_client(policy) as client:
        async with open_download(client.session, f"{dl.url}/chain5/0", headers={}, policy=policy):
            pass
        assert dl.paths == [f"/chain5/{n}" for n in range(6)]
        dl.log.clear()
        message = await refusal_of(client, f"{dl.url}/chain6/0", policy)
    assert "more than 5 redirects" in message
    assert dl.paths == [f"/chain6/{n}" for n in range(6)]  # /chain6/6 never requested


# -- open_download: where the first URL leads ------------------------------------------------
PUBLIC_API = "https://203.0.113.10/v2"  # only the policy is built from it: never connected to


async def test_a_name_resolving_to_loopback_is_refused_for_a_public_api(serve: Serve) -> None:
    dl = await serve(ok)
    policy = policy_for(PUBLIC_API)
    async with download_client(policy) as client:
        message = await refusal_of(client, f"http://localhost:{dl.port}/final", policy)
    assert "localhost" in message and "loopback" in message
    assert dl.log == []


async def test_literal_forbidden_addresses_are_refused_before_any_request(serve: Serve) -> None:
    dl = await serve(ok)
    policy = policy_for(PUBLIC_API)
    async with download_client(policy) as client:
        for url in (
            f"http://127.0.0.1:{dl.port}/final",
            f"http://[::ffff:127.0.0.1]:{dl.port}/final",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/latest/meta-data/",
            "http://100.100.100.200/latest/meta-data/",
            "http://169.254.1.1/x",
        ):
            await refusal_of(client, url, policy)
        assert client.started == []
    assert dl.log == []


async def test_names_go_through_the_policy_and_allowed_ones_connect(serve: Serve) -> None:
    """A stand-in DNS (a real AbstractResolver with fixed answers) under the guard."""
    api = await serve(ok)
    dl = await serve(ok)
    dns = StaticDNS({"recordings.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"]})
    policy = policy_for(f"{api.url}/v2")
    async with download_client(policy, resolver=dns) as client:
        url = f"http://recordings.test:{dl.port}/final"
        async with open_download(client.session, url, headers={}, policy=policy) as resp:
            assert resp.status == 200
        message = await refusal_of(client, "http://meta.test/latest/meta-data/", policy)
    assert dl.paths == ["/final"]
    assert "meta.test" in message and "metadata" in message


async def test_the_resolver_drops_forbidden_answers() -> None:
    """DNS rebinding: whatever a name answers, only allowed addresses are ever connected to."""
    dns = StaticDNS(
        {"mixed.test": ["93.184.216.34", "127.0.0.1", "10.0.0.1"], "inside.test": ["10.0.0.1"]}
    )
    guard = netguard.GuardedResolver(policy_for(PUBLIC_API), dns)
    answers = await guard.resolve("mixed.test", 443, socket.AF_UNSPEC)
    assert [a["host"] for a in answers] == ["93.184.216.34"]
    with pytest.raises(RefusedDestination, match=r"inside\.test: 10\.0\.0\.1 is a private"):
        await guard.resolve("inside.test", 443, socket.AF_UNSPEC)
    await guard.close()


async def test_a_first_url_of_the_wrong_shape_is_unsafe(serve: Serve) -> None:
    dl = await serve(ok)
    policy = policy_for(f"http://127.0.0.1:{dl.port + 1}/v2")
    async with download_client(policy) as client:
        with pytest.raises(UnsafeValue, match="credentials"):
            url = f"http://user:hunter2@127.0.0.1:{dl.port}/final"
            async with open_download(client.session, url, headers={}, policy=policy):
                pass
        assert client.started == []
    assert dl.log == []


async def test_open_download_needs_the_guarded_connector(serve: Serve) -> None:
    dl = await serve(ok)
    policy = policy_for(PUBLIC_API)
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(TypeError, match="download_connector"):
            async with open_download(plain, f"{dl.url}/final", headers={}, policy=policy):
                pass
    async with download_client(policy_for("https://198.51.100.1/v2")) as client:
        with pytest.raises(TypeError):
            async with open_download(client.session, f"{dl.url}/final", headers={}, policy=policy):
                pass
    assert dl.log == []


# -- the API client --------------------------------------------------------------------------
def api_settings(server: Server, **kw: Any) -> TelnyxSettings:
    values: dict[str, Any] = {"max_attempts": 1, "max_backoff": 0.01, **kw}
    return TelnyxSettings(base_url=f"{server.url}/v2", api_key=Secret(API_KEY), **values)


def listing(*entries: Any) -> str:
    return json.dumps({"data": list(entries), "meta": {"total_pages": 1, "total_results": 1}})


async def test_the_api_client_never_follows_a_redirect_to_another_origin(serve: Serve) -> None:
    other = await serve(ok)
    page = listing({"id": GOOD_ID, "status": "completed"})

    async def moved(request: web.Request) -> web.StreamResponse:
        location = f"{other.url}/v2/room_recordings?{request.query_string}"
        return web.Response(status=302, headers={"Location": location}, text=page)

    api = await serve(moved)
    async with TelnyxClient(api_settings(api)) as client:
        with pytest.raises(ApiError) as caught:
            await client.list_page(Filters(), 1)
    message = str(caught.value)
    assert f"http://127.0.0.1:{api.port}" in message and f"http://127.0.0.1:{other.port}" in message
    assert "telnyx.base_url" in message and API_KEY not in message
    assert other.log == []
    assert [s.headers["Authorization"] for s in api.log] == [f"Bearer {API_KEY}"]


async def test_the_api_client_follows_a_get_within_its_origin(serve: Serve) -> None:
    page = listing({"id": GOOD_ID, "status": "completed"})

    async def api_handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/room_recordings":
            return web.Response(status=301, headers={"Location": "/v2/moved?x=1"})
        if request.path == "/v2/moved":
            return web.Response(text=page, content_type="application/json")
        if request.path == "/v2/loop":
            return web.Response(status=302, headers={"Location": "/v2/loop"})
        return web.Response(status=307, headers={"Location": "/v2/elsewhere"})

    api = await serve(api_handler)
    async with TelnyxClient(api_settings(api)) as client:
        result = await client.list_page(Filters(), 1)
        assert [r.id for r in result.recordings] == [GOOD_ID]
        with pytest.raises(ApiError, match="refusing to repeat a DELETE"):
            await client.delete(GOOD_ID)
        with pytest.raises(ApiError, match="redirected more than 3 times"):
            await client.once._request("GET", "/loop")
    assert api.paths[:2] == [
        "/v2/room_recordings?page%5Bsize%5D=250&page%5Bnumber%5D=1",
        "/v2/moved?x=1",
    ]
    assert "/v2/elsewhere" not in api.paths
    assert api.paths.count("/v2/loop") == 4


def flood(declared: int | None, sent: list[int], done: asyncio.Event) -> Handler:
    """A listing that never ends: 1 MiB chunks, up to 96 MiB, counting what was written."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared is not None:
            resp.content_length = declared
        try:
            await resp.prepare(request)
            await resp.write(b'{"data": [')
            chunk = b" " * MiB
            while sent[0] < 96 * MiB:
                await resp.write(chunk)
                sent[0] += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            done.set()
        return resp

    return handler


@pytest.mark.parametrize("declared", [None, 1 << 30])
async def test_a_page_over_the_cap_is_refused_without_reading_it_all(
    serve: Serve, declared: int | None
) -> None:
    sent, done = [0], asyncio.Event()
    api = await serve(flood(declared, sent, done))
    async with TelnyxClient(api_settings(api)) as client:
        with pytest.raises(MalformedResponse, match=r"more than 16 MiB .* refusing it"):
            await client.list_page(Filters(), 1)
    await asyncio.wait_for(done.wait(), 30)
    # The client stopped at the cap (or at once, for a declared size): what the server got
    # out is the cap at most plus what socket buffers hold, far from the 96 MiB on offer.
    limit = MAX_RESPONSE_BYTES // 2 if declared else MAX_RESPONSE_BYTES + 16 * MiB
    assert sent[0] < limit


async def test_an_error_body_is_cut_not_refused(serve: Serve) -> None:
    async def huge_error(request: web.Request) -> web.StreamResponse:
        return web.Response(status=422, text='{"errors": [{"title": "' + "x" * MiB + '"}]}')

    api = await serve(huge_error)
    async with TelnyxClient(api_settings(api)) as client:
        with pytest.raises(ApiError, match="HTTP 422"):
            await client.list_page(Filters(), 1)


async def test_an_oversized_id_is_reported_with_a_short_stand_in(serve: Serve) -> None:
    long_id = "a" * 200
    page = listing({"id": GOOD_ID, "status": "completed"}, {"id": long_id, "status": "completed"})

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text=page, content_type="application/json")

    api = await serve(answer)
    async with TelnyxClient(api_settings(api)) as client:
        result = await client.list_page(Filters(), 1)
    assert [r.id for r in result.recordings] == [GOOD_ID]
    [(stand_in, reason)] = result.malformed
    assert stand_in.startswith("malformed-") and len(stand_in) <= 32
    assert "200 characters" in reason
    assert long_id not in reason and long_id[:20] not in reason


# -- entries too big to keep -----------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,why",
    [
        ({"id": "a" * 129}, "129 characters"),
        ({"download_url": "https://h/" + "a" * 8200}, "download_url is more than 8192 bytes"),
        ({"room_id": "r" * 9000}, "'room_id' is 9000 characters"),
        ({"metadata": {"notes": ["n" * 9000]}}, "'metadata.notes[0]' is 9000 characters"),
        ({f"k{i}": "v" * 1000 for i in range(70)}, "more than 65536 bytes"),
        ({"many": list(range(20000))}, "more than 65536 bytes"),
    ],
)
def test_entries_too_big_to_keep_are_malformed(extra: dict[str, Any], why: str) -> None:
    entry = {"id": GOOD_ID, "status": "completed", **extra}
    with pytest.raises(MalformedEntry, match=re.escape(why)) as caught:
        Recording.from_api(entry)
    assert len(str(caught.value)) < 200
    page = parse_page(json.dumps({"data": [entry]}), 1)
    assert page.recordings == [] and len(page.malformed) == 1


def test_entries_at_the_bounds_are_kept() -> None:
    url = "https://h/" + "a" * (8 * 1024 - len("https://h/"))
    rec = Recording.from_api({"id": "b" * 128, "download_url": url, "room_id": "r" * 8192})
    assert rec.id == "b" * 128 and rec.download_url == url


def test_a_page_nested_too_deep_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedResponse):
        parse_page('{"data": [' + "[" * 200_000 + "]" * 200_000 + "]}", 1)


# -- helpers ---------------------------------------------------------------------------------
class StaticDNS(AbstractResolver):
    """Fixed answers, like a hosts file: a stand-in for a DNS server, no network."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self._table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self._table:
            raise OSError(f"{host}: no such name")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self._table[host]
        ]

    async def close(self) -> None:
        pass


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for 127.0.0.1 made here (server context, client context trusting it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client
