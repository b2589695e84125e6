# Sourced by the bench scripts (from the repository root): a work dir, the release binaries,
# cleanup of everything started (listed in `pids`), and small helpers.
WORK=$(mktemp -d)
BIN=target/release/zhili
GEN=target/release/zhili-bench
pids=()
# TERM first (an nginx master killed with -9 leaves its workers behind), then KILL.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
# The number after "name": in a JSON line.
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/"; }
machine() { echo "$(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(free -g | awk '/Mem/ {print $2}') GiB; $(date -u +%Y-%m-%dT%H:%MZ)"; }
# Waits until the given processes are idle (no CPU tick, 10 ms, between them over 300 ms; at most
# 15 s), so one server's background work after a run (flushes, compaction, raft) does not land
# in the next server's measurement on the shared CPU.
settle() { # pid...
  local before after
  ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0))); done; echo $t; }
  for _ in $(seq 50); do
    before=$(ticks "$@"); sleep 0.3; after=$(ticks "$@")
    [ $((after - before)) -le 0 ] && return 0
  done
}
