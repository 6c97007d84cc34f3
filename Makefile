VENV := .venv
PY := $(VENV)/bin/python
N ?= 3
VOLUMES ?= 1
ISOLATE ?=
APT_PACKAGES := fuse3 libfuse3-dev pkg-config fio attr gcc qemu-utils restic borgbackup etcd-server

.PHONY: setup test test-device test-isolated bench lint clean cluster cluster-down demo-vms

setup:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m csvfs.fuse_shim --build

test:
	$(VENV)/bin/ruff check csvfs coordinator vmload scripts tests
	$(PY) -m pytest -q

# The multi-node tests again, each volume on a loop device that the nodes open with
# O_DIRECT (tests/cluster.py ON_LOOP_DEVICES); `make test` runs a few of them so.
DEVICE_TESTS := tests/test_cluster.py tests/test_failover.py tests/test_fencing.py \
  tests/test_crash.py tests/test_peers.py tests/test_snapshots.py tests/test_small_blocks.py \
  tests/test_vmload.py tests/test_move.py tests/test_redirect.py tests/test_shared_maps.py \
  tests/test_locks.py tests/test_append.py tests/test_posix.py tests/test_small_files.py \
  tests/test_smoke.py tests/test_release.py tests/test_backup.py tests/test_balance.py \
  tests/test_backup_mount.py tests/test_change_tracking.py tests/test_restore_image.py \
  tests/test_etcd_election.py
test-device:
	CSVFS_TEST_VOLUME=loop $(PY) -m pytest -q $(DEVICE_TESTS)

# The tests whose nodes are csvfs processes started by the nodes fixture: with
# CSVFS_TEST_ISOLATE=1 each node runs in a network and a mount namespace of its own
# (tests/cluster.py Isolation; needs root). `make test` runs a few of them both ways.
ISOLATED_TESTS := $(addprefix tests/test_,$(addsuffix .py,append backup bad_input balance \
	cluster crash debug_log failover fencing isolated_nodes locks move peers posix redirect \
	release restore_image shared_maps small_files smoke vmload etcd_election))

test-isolated:
	CSVFS_TEST_ISOLATE=1 $(PY) -m pytest -q $(ISOLATED_TESTS)

bench:
	$(PY) scripts/bench.py $(if $(BASELINE),--baseline $(BASELINE))

cluster:
	$(PY) scripts/cluster.py up -n $(N) --volumes $(VOLUMES) $(if $(filter 1,$(ISOLATE)),--isolate)

cluster-down:
	$(PY) scripts/cluster.py down

DEMO_SECONDS ?= 60
demo-vms:
	$(PY) scripts/demo_vms.py --seconds $(DEMO_SECONDS)

lint:
	$(VENV)/bin/ruff check csvfs coordinator vmload scripts tests

clean:
	rm -rf $(VENV) *.egg-info build
