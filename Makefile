# Two entry points for a fresh machine: `make serve MODEL=...` and `make test` (see README.md).
VENV ?= .venv
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Where the CPU build of torch comes from. Empty: pip's own sources (a local wheel folder or an index
# that serves the CPU build). On an ordinary networked machine the default index serves the CUDA build
# (gigabytes of GPU libraries): make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIN := $(shell sed -n 's/^ *\(torch==[0-9.]*\).*/\1/p' setup.cfg)

.PHONY: venv serve test test-fast test-deps

$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned in setup.cfg; installed first from TORCH_INDEX when set, it is the CPU build
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install -q --index-url $(TORCH_INDEX) '$(TORCH_PIN)')
	$(VENV)/bin/pip install -q -e '.[test,soak]'
	touch $@

venv: $(VENV)/.installed

serve: venv
	@test -n "$(MODEL)" || { echo "name the model, e.g. make serve MODEL=builtin:tiny"; exit 2; }
	$(VENV)/bin/edgechat serve --model $(MODEL) $(ARGS)

# Debian packages the tests drive for real: promtool/prometheus, amtool/alertmanager, headless chromium,
# redis-server (the tests start their own on a free loopback port), g++ (the compiled decode kernels:
# the wheel's build and an editable checkout's first start), g++-aarch64-linux-gnu and qemu-user-static
# (the aarch64 kernels, cross-compiled and run under emulation); for the simulated fleet (tests/fleet, `edgechat
# fleet`): victoria-metrics (the store, vmagent, vmalert), prometheus-node-exporter (the expected-devices
# list) and openssl (the uplinks' self-signed certificate); for the fault suite (tests/faults): faketime
# (libfaketime, the stepped wall clock) and gcc (cc, which builds its preloaded shims)
test-deps:
	@command -v promtool >/dev/null && command -v amtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
	  && command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v redis-server >/dev/null \
	  && command -v g++ >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null \
	  && command -v victoria-metrics >/dev/null && command -v vmagent >/dev/null && command -v vmalert >/dev/null \
	  && command -v prometheus-node-exporter >/dev/null && command -v openssl >/dev/null \
	  && command -v faketime >/dev/null && command -v cc >/dev/null \
	  || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus prometheus-alertmanager chromium chromium-driver redis-server g++ \
	         g++-aarch64-linux-gnu qemu-user-static victoria-metrics prometheus-node-exporter openssl faketime gcc; }

test: venv test-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: venv test-deps
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)
