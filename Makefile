# sandbox-kernel: set-up, demo, tests. Every target installs what it needs itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SK := $(VENV)/bin/sandbox-kernel
KERNEL := python3-sandbox
TOUR := notebooks/tour.ipynb
TOUR_OUT := notebooks/tour-executed.ipynb
export DEBIAN_FRONTEND := noninteractive
# Venvs of Debian's own Python, which every user can run (see unit-unprivileged, hub).
UNPRIV_VENV := build/unit-venv

.PHONY: setup system venv criu kernelspec demo test unit unit-unprivileged integration lint lab bench hub hub-setup e2e-setup cluster-setup cluster cluster-down clean

setup: system venv criu kernelspec

# runc, iproute2, nftables and btrfs-progs from the distribution; CRIU >= 4.2 comes from `criu`.
system:
	@if ! command -v runc >/dev/null || ! command -v ip >/dev/null || ! command -v nft >/dev/null || ! command -v mkfs.btrfs >/dev/null || ! test -x /usr/bin/tini; then \
		echo "Installing runc, iproute2, nftables, btrfs-progs and tini"; \
		apt-get update -q && apt-get install -y -q runc iproute2 nftables btrfs-progs tini; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

criu: venv
	$(SK) install-criu

kernelspec: venv
	$(SK) install --name $(KERNEL) --display-name "Python 3 (sandbox)" --sys-prefix

demo: setup
	$(VENV)/bin/jupyter execute $(TOUR) --kernel_name=$(KERNEL) --output=tour-executed
	@echo "The executed tour is at $(CURDIR)/$(TOUR_OUT)"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# mypy cannot follow setuptools' package-dir mapping: give it the installed layout.
	rm -rf build/typecheck && mkdir -p build/typecheck/sandbox_kernel
	ln -s $(CURDIR)/sandbox_kernel/*.py $(CURDIR)/sandbox_kernel/py.typed build/typecheck/sandbox_kernel/
	ln -s $(CURDIR)/runtime build/typecheck/sandbox_kernel/runtime
	ln -s $(CURDIR)/magics build/typecheck/sandbox_kernel/magics
	cd build/typecheck && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p sandbox_kernel

# The daemon's tests run users' servers with the unprivileged venv's Python, and a
# real JupyterHub from the hub's venv; the browser tests (tests/e2e) run JupyterLab
# from the hub's venv too, in Chromium.
# A real Slurm cluster of three nodes on this machine (runtime/cluster.py).
cluster-setup:
	@if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then \
		echo "Installing Slurm and munge"; \
		apt-get update -q && apt-get install -y -q slurm-wlm munge; \
	fi

cluster: setup cluster-setup
	$(PY) -m sandbox_kernel.runtime.cluster up

cluster-down: venv
	$(PY) -m sandbox_kernel.runtime.cluster down

test: setup lint $(UNPRIV_VENV)/.installed hub-setup e2e-setup cluster-setup
	$(PY) -m pytest tests
	$(MAKE) unit-unprivileged

unit: venv
	$(PY) -m pytest tests/unit

# The unit tests again as uid 65534, to show they need no root. Debian's own Python:
# the default one here may live under /root, where other users cannot run it.
unit-unprivileged: $(UNPRIV_VENV)/.installed
	setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
		$(UNPRIV_VENV)/bin/python -m pytest tests/unit -q -p no:cacheprovider
# A venv of Debian's Python at $(1) (made anew) with the pip packages $(2).
define debian_venv
	@command -v /usr/bin/python3 >/dev/null && /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || \
		(apt-get update -q && apt-get install -y -q python3 python3-venv)
	rm -rf $(1)
	/usr/bin/python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2)
endef

$(UNPRIV_VENV)/.installed: pyproject.toml
	$(call debian_venv,$(UNPRIV_VENV),-e '.[test]')
	chmod -R a+rX $(UNPRIV_VENV)
	touch $@

# A real JupyterHub (docs/jupyterhub_config.py) in a venv every user can run, with
# configurable-http-proxy from npm and the sandboxed kernelspec.
HUB_VENV := build/hub-venv
HUB_NODE := build/hub-node
HUB_USERS := sk-demo-1 sk-demo-2 sk-demo-3
hub-setup: $(HUB_VENV)/.installed $(HUB_NODE)/.installed
$(HUB_VENV)/.installed: pyproject.toml Makefile
	$(call debian_venv,$(HUB_VENV),jupyterhub jupyterlab notebook -e .)
	$(HUB_VENV)/bin/sandbox-kernel install --name $(KERNEL) --display-name "Python 3 (sandbox)" --sys-prefix
	chmod -R a+rX $(HUB_VENV)
	touch $@
$(HUB_NODE)/.installed:
	@command -v npm >/dev/null || (apt-get update -q && apt-get install -y -q npm)
	mkdir -p $(HUB_NODE)
	npm install --silent --prefix $(HUB_NODE) configurable-http-proxy
	touch $@

# Headless Chromium and its driver for tests/e2e; selenium is in the `test` extra.
e2e-setup: venv
	@if ! test -x /usr/bin/chromium || ! command -v chromedriver >/dev/null; then \
		echo "Installing chromium and chromium-driver"; \
		apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	fi

# Try it: three users (password "sandbox"), their kernels through the daemon.
hub: setup hub-setup
	@for u in $(HUB_USERS); do id $$u >/dev/null 2>&1 || useradd --create-home $$u; done
	@test -S /run/sandbox-kernel/daemon.sock || $(SK) daemon --detach
	@echo "Open http://127.0.0.1:8000 and log in as sk-demo-1, sk-demo-2 or sk-demo-3, password sandbox"
	SK_HUB_USERS=$$(echo $(HUB_USERS) | tr ' ' ,) $(HUB_VENV)/bin/jupyterhub -f docs/jupyterhub_config.py

lab: setup
	$(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab --allow-root --notebook-dir=notebooks

bench: setup
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/startup.py

clean:
	-$(SK) gc
	rm -rf $(VENV) build $(TOUR_OUT)
