"""
The optional plain-HTTP listener: every request is redirected to the same
host and path over https.
"""

from __future__ import annotations

from twisted.web import server
from twisted.web.resource import Resource



def https_location(host_header: bytes | None, fallback_host: str, target: bytes, https_port: int) -> bytes:
    """
    The https URL for a request to C{target} that named C{host_header}.
    """
    host = fallback_host
    if host_header:
        text = host_header.decode("ascii", "replace")
        if text.startswith("["):
            host = text[1:].partition("]")[0]
        else:
            name, _, port = text.rpartition(":")
            host = name if name and port.isdigit() else text
    if ":" in host:
        host = f"[{host}]"
    port = "" if https_port == 443 else f":{https_port}"
    if not target.startswith(b"/"):
        target = b"/"
    return f"https://{host}{port}".encode("ascii", "replace") + target


class RedirectToHTTPS(Resource):
    isLeaf = True

    def __init__(self, https_port: int) -> None:
        super().__init__()
        self._https_port = https_port

    def render(self, request) -> bytes:
        location = https_location(
            request.getHeader(b"host"),
            request.getHost().host,
            request.uri,
            self._https_port,
        )
        # 308 keeps the method and body of a PUT or POST; 301 is what every
        # client understands for the rest.
        request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
        request.setHeader(b"Location", location)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Connection", b"close")
        return b"quayfront serves https only\n"


def redirect_site(https_port: int, reactor) -> server.Site:
    site = server.Site(RedirectToHTTPS(https_port), reactor=reactor)
    site.displayTracebacks = False
    return site
