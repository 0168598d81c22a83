"""The TLS stack is loaded only when a connection needs it (llamaswap.tls)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from tests.test_plugin import parse_twistd, write_config, FAKE_CMD

# Run in a fresh interpreter: whether the stack loads depends on what was imported before.
_SCRIPT = textwrap.dedent("""
    import datetime, sys
    from llamaswap import tls
    assert tls.defer(), "a fresh process defers the TLS stack"
    import llamaswap.service, llamaswap.web.tree  # everything the daemon imports
    from twisted.internet import reactor
    assert not tls.loaded(), "nothing loaded the TLS stack"

    # https through the proxy's own client: the stack loads on first use and works, although
    # Twisted's modules were imported without it
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    from twisted.internet import ssl
    assert tls.loaded()
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.web import resource, server
    from llamaswap import proxy

    class Hello(resource.Resource):
        isLeaf = True
        def render_GET(self, request):
            return b"hello over tls"

    certificate = ssl.PrivateCertificate.loadPEM(pem)
    site = TLSMemoryBIOFactory(certificate.options(), False, server.Site(Hello()))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    tls.client_endpoint = lambda host, inner: tls.TLSClientEndpoint(
        ssl.optionsForClientTLS(host, trustRoot=ssl.Certificate.loadPEM(pem)), inner)
    client, pool = proxy.make_http_client(reactor)
    result = {}
    def done(body):
        result["body"] = body
    def failed(f):
        result["error"] = f.getTraceback()
    d = client.get(b"https://localhost:%d/" % port.getHost().port)
    d.addCallback(lambda response: response.content()).addCallbacks(done, failed)
    d.addBoth(lambda _: pool.closeCachedConnections()).addBoth(lambda _: reactor.stop())
    reactor.callLater(20, reactor.stop)
    reactor.run()
    assert result.get("body") == b"hello over tls", result
    print("ok")
""")


class DeferredTLSTests(SynchronousTestCase):
    def test_not_loaded_until_an_https_connection_needs_it(self):
        run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
        self.assertEqual((run.returncode, run.stdout.strip()), (0, "ok"), run.stderr)

    def test_nothing_happens_once_twisted_loaded_it(self):
        from llamaswap import tls
        import twisted.internet.tcp  # noqa: F401 - loaded in this process already

        self.assertFalse(tls.defer())


class PlainListenTests(SynchronousTestCase):
    def test_listeners_that_need_no_tls(self):
        from llamaswap.tap import _plain_listen

        for value in (":8080", "127.0.0.1:8080", "[::1]:8080", "tcp:8080", "tcp6:8080:interface=\\:\\:1",
                      "unix:/run/llamaswap.sock", "systemd:domain=INET:index=0"):
            self.assertTrue(_plain_listen(value), value)
        for value in ("ssl:8443:privateKey=k.pem", "tls:8443", "le:/certs:tcp:443"):
            self.assertFalse(_plain_listen(value), value)
