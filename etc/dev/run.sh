#!/usr/bin/env bash
# Start a local docker-registry and quayfront in front of it, in the
# foreground.  Ctrl-C stops both.  Called by `make run` (which first
# installs missing system packages and the .venv); state lives in run/.
#
#   proxy listener (PROXY header, then TLS): 127.0.0.1:8443
#   plain TLS listener:                      127.0.0.1:443 (9443 when not root)
#   docker-registry:                         127.0.0.1:5000
#
# Environment overrides: QF_PROXY_PORT, QF_TLS_PORT, QF_REGISTRY_PORT.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT_DIR=$(pwd)
RUN_DIR="$ROOT_DIR/run"
VPY="$ROOT_DIR/.venv/bin/python"

if [ "$(id -u)" -eq 0 ]; then
    default_tls_port=443
else
    default_tls_port=9443
    echo "run: not root, so the plain TLS listener uses port 9443 instead of 443"
fi
PROXY_PORT=${QF_PROXY_PORT:-8443}
TLS_PORT=${QF_TLS_PORT:-$default_tls_port}
REGISTRY_PORT=${QF_REGISTRY_PORT:-5000}

for tool in openssl docker-registry curl; do
    command -v "$tool" >/dev/null || { echo "run: $tool is missing; run 'make deps'" >&2; exit 1; }
done
[ -x "$VPY" ] || { echo "run: .venv is missing; run 'make venv'" >&2; exit 1; }

mkdir -p "$RUN_DIR/registry"

# Self-signed dev certificate for localhost, 127.0.0.1 and ::1.
if [ ! -s "$RUN_DIR/cert.pem" ] || [ ! -s "$RUN_DIR/key.pem" ]; then
    echo "run: creating a self-signed certificate in run/"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 365 -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
        -keyout "$RUN_DIR/key.pem" -out "$RUN_DIR/cert.pem" 2>/dev/null
    chmod 600 "$RUN_DIR/key.pem"
fi

port_in_use() {
    # LISTEN sockets from /proc (no extra tools needed); $1 is the port.
    local hex
    hex=$(printf ':%04X' "$1")
    awk -v p="$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { found = 1 }
                     END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
for p in "$REGISTRY_PORT" "$PROXY_PORT" "$TLS_PORT"; do
    if port_in_use "$p"; then
        echo "run: port $p is already in use (a registry or web server service?)" >&2
        exit 1
    fi
done

REGISTRY_PID=""
cleanup() {
    if [ -n "$REGISTRY_PID" ] && kill -0 "$REGISTRY_PID" 2>/dev/null; then
        echo "run: stopping docker-registry (pid $REGISTRY_PID)"
        kill "$REGISTRY_PID" 2>/dev/null || true
        wait "$REGISTRY_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY="$RUN_DIR/registry" \
REGISTRY_HTTP_ADDR="127.0.0.1:$REGISTRY_PORT" \
    docker-registry serve "$ROOT_DIR/etc/dev/registry.yml" >>"$RUN_DIR/registry.log" 2>&1 &
REGISTRY_PID=$!
echo "run: docker-registry pid $REGISTRY_PID on 127.0.0.1:$REGISTRY_PORT (log: run/registry.log)"

# Wait (bounded) until the registry answers GET /v2/.
ready=""
for _ in $(seq 1 100); do
    if ! kill -0 "$REGISTRY_PID" 2>/dev/null; then
        echo "run: docker-registry exited; see run/registry.log" >&2
        tail -n 20 "$RUN_DIR/registry.log" >&2 || true
        exit 1
    fi
    if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$REGISTRY_PORT/v2/" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
[ -n "$ready" ] || { echo "run: docker-registry did not answer within 10s" >&2; exit 1; }

config_args=()
if [ -f "$ROOT_DIR/etc/quayfront.toml" ]; then
    config_args=(--config "$ROOT_DIR/etc/quayfront.toml")
else
    echo "run: etc/quayfront.toml not found; using built-in defaults"
fi

echo "run: quayfront on 127.0.0.1:$PROXY_PORT (PROXY header + TLS) and 127.0.0.1:$TLS_PORT (TLS)"
echo "run: try: curl -k https://127.0.0.1:$TLS_PORT/health/instance"
echo "run:      curl -k --haproxy-protocol https://127.0.0.1:$PROXY_PORT/v2/"
echo "run: Ctrl-C stops quayfront and the registry"

# Not exec: the EXIT trap must stop the registry when quayfront ends.
# --drain-delay 0: no load balancer watches this instance's health, so
# Ctrl-C closes the listeners at once (requests in flight still finish).
# Foreground, so Ctrl-C from the terminal reaches twistd directly (the
# registry, a background job of this non-interactive shell, ignores it and
# is stopped by the trap).  The repository root on PYTHONPATH lets twistd
# find the plugin in twisted/plugins/.
set +e
PYTHONPATH="$ROOT_DIR${PYTHONPATH:+:$PYTHONPATH}" \
"$ROOT_DIR/.venv/bin/twistd" -n --pidfile= quayfront "${config_args[@]}" \
    --proxy-listen "127.0.0.1:$PROXY_PORT" \
    --listen "127.0.0.1:$TLS_PORT" \
    --upstream "http://127.0.0.1:$REGISTRY_PORT" \
    --cert "$RUN_DIR/cert.pem" --key "$RUN_DIR/key.pem" \
    --access-log - \
    --drain-delay 0
rc=$?
set -e
exit "$rc"
