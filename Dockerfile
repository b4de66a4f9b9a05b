# quayfront's container image: the Debian package from `make deb`, so the
# image and the package are one artifact and no pip runs here.
#
#   make deb image            (podman; see etc/docker/ for hosts without a registry)
#   docker build -t quayfront .   (after make deb, with Docker Hub access)
#
# Ports (all above 1024, so no capability is needed):
#   8443  PROXY + TLS   (proxy_listener, as in the package)
#   8444  TLS + health  (tls_listener; 443 in the package)
#   9091  metrics, on 127.0.0.1 inside the container unless
#         QUAYFRONT_METRICS_LISTEN=0.0.0.0:9091 asks otherwise
#
# Configuration: /etc/quayfront/quayfront.toml (mount another one and set
# QUAYFRONT_CONFIG), plus QUAYFRONT_* variables named after the command-line
# options (QUAYFRONT_UPSTREAM, QUAYFRONT_CERT, ...).  Certificates: mount
# them at /etc/quayfront/tls/ (cert.pem, key.pem) or name them with
# QUAYFRONT_CERT and QUAYFRONT_KEY.  The access log goes to standard output.
#
# Runs as UID 1001 (group 0, as Quay's images) and writes no file at all
# (no pid file, logs to standard output, the twisted plugin cache is built
# into the image), so `--read-only` works; HOME is /tmp, which podman
# mounts as a tmpfs with --read-only (docker: add --tmpfs /tmp).  Stopping drains: give it a stop timeout
# above http.drain_timeout_s (`docker stop -t 70`, `podman stop -t 70`).
FROM debian:bookworm-slim

COPY dist/quayfront_*.deb /tmp/
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends /tmp/quayfront_*.deb; \
    rm -rf /tmp/quayfront_*.deb /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    # The container listens on 8444 for TLS and logs to standard output.
    sed -i -e 's|^address = "0.0.0.0:443"$|address = "0.0.0.0:8444"|' \
        -e 's|^path = "/var/log/quayfront/access.log"$|path = "-"|' /etc/quayfront/quayfront.toml; \
    grep -q '^address = "0.0.0.0:8444"$' /etc/quayfront/quayfront.toml; \
    grep -q '^path = "-"$' /etc/quayfront/quayfront.toml; \
    chmod 0755 /etc/quayfront/tls

ENV HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1001:0
WORKDIR /tmp
EXPOSE 8443 8444
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=6s --start-period=10s --retries=3 \
    CMD ["quayfront-entrypoint", "--healthcheck"]
ENTRYPOINT ["quayfront-entrypoint"]
