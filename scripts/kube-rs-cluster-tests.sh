#!/usr/bin/env bash
# Runs kube-rs's own cluster tests (the `#[ignore = "needs cluster ..."]` tests
# shipped inside the published kube 5.0 crates) against the in-memory API of
# `defender-offboard dev`: a real client's test suite for it.
#
# The tests are compiled from the crates' sources in the local cargo registry
# (a scratch workspace in target/kube-rs-cluster-tests, pinned with this
# repository's Cargo.lock; crates.io is used only for dev-dependencies the
# registry lacks). Run from anywhere; exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
kube_version=5.0.0

# Tests that touch resources the dev API serves. Left out, because they need
# what an in-memory API without a kubelet cannot serve: pods (logs, exec,
# eviction, ephemeral containers, `pod_can_*`), CSRs, APIService and the
# `apps` group (`group_discovery_oneshot`, `aggregated_discovery_*`,
# `discovery_run_aggregated`), and client TLS setups (`custom_client_*`).
kube_tests=(custom_resource_generates_correct_core_structs derived_resource_queryable_and_has_subresources api_get_opt_handles_404)
client_tests=(api::entry::tests::entry_create_missing_object api::entry::tests::entry_update_existing_object api::entry::tests::entry_create_dry_run)
runtime_tests=(events::test::event_recorder_attaches_events events::test::event_recorder_attaches_events_without_namespace events::test::event_recorder_cache_retain)

registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/kube-$kube_version 2>/dev/null | head -n1 || true)
if [ -z "$registry" ]; then
  # Fetch the crates into the registry through cargo itself.
  cargo fetch --locked >/dev/null
  registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/kube-$kube_version | head -n1)
fi
registry=$(dirname "$registry")

work=$root/target/kube-rs-cluster-tests
mkdir -p "$work"
for crate in kube kube-client kube-runtime; do
  rm -rf "$work/$crate"
  cp -r "$registry/$crate-$kube_version" "$work/$crate"
done
cat >"$work/Cargo.toml" <<TOML
[workspace]
resolver = "3"
members = ["kube", "kube-client", "kube-runtime"]

# The copies stand in for the published crates, so each crate's tests link
# the others from here.
[patch.crates-io]
kube = { path = "kube" }
kube-client = { path = "kube-client" }
kube-runtime = { path = "kube-runtime" }
TOML
# Publishing drops the crates' dev-dependency on `kube` itself (a cycle), which
# their tests import; give it back.
for crate in kube-client kube-runtime; do
  cat >>"$work/$crate/Cargo.toml" <<TOML

[dev-dependencies.kube]
path = "../kube"
features = ["derive", "runtime", "ws"]
TOML
done
[ -f "$work/Cargo.lock" ] || cp "$root/Cargo.lock" "$work/Cargo.lock"

cargo build --quiet --bin defender-offboard
dev_dir=$(mktemp -d)
trap 'kill "$dev_pid" 2>/dev/null || true; wait "$dev_pid" 2>/dev/null || true; rm -rf "$dev_dir"' EXIT
RUST_LOG=warn "$root/target/debug/defender-offboard" dev --without-controller \
  --kubeconfig-out "$dev_dir/kubeconfig" >"$dev_dir/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 100); do
  [ -s "$dev_dir/kubeconfig" ] && break
  kill -0 "$dev_pid" 2>/dev/null || { cat "$dev_dir/dev.log" >&2; exit 1; }
  sleep 0.1
done
[ -s "$dev_dir/kubeconfig" ] || { echo "dev did not start" >&2; cat "$dev_dir/dev.log" >&2; exit 1; }
export KUBECONFIG=$dev_dir/kubeconfig

cd "$work"
# No debug info and no incremental state: a third of the disk and faster links.
export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0
# One invocation: one feature resolution, so each crate compiles once. A filter
# that names another crate's test matches nothing in this one.
cargo test --no-fail-fast -p kube -p kube-client -p kube-runtime --lib \
  --features kube/derive,kube/runtime,kube-client/rustls-tls,kube-client/ws \
  -- --ignored --exact --test-threads 1 \
  "${kube_tests[@]/#/test::}" "${client_tests[@]}" "${runtime_tests[@]}"
