#!/usr/bin/env bash
# A private Docker engine for `make image-test`, and the undo of everything it changes on the host.
#
#   tools/image_test/engine.sh start   # prints `export DOCKER_HOST=...`; reuses a running engine if one answers
#   tools/image_test/engine.sh stop    # stops the private engine; restores iptables, ip_forward, the bridge
#   tools/image_test/engine.sh status  # what is running and what was recorded
#
# As root, a missing engine is installed from Debian (apt-get install docker.io) and started with its own
# socket, data root and exec root, so it never touches a system engine's state. Before it starts, the host's
# packet filter (`nft list ruleset`; `iptables-save` where nft is absent), `net.ipv4.ip_forward` and the list of
# network links are recorded under STATE_DIR; `stop` puts all three back exactly, which removes what dockerd
# added (docker0, the DOCKER* chains, the FORWARD DROP policy, the NAT rules), and checks that they match. The
# image cache (DATA_ROOT) is kept between runs; `make image-test-clean` removes it.
set -euo pipefail

SOCKET=${LAMBDATRAIN_DOCKER_SOCKET:-/run/lambdatrain-docker.sock}
DATA_ROOT=${LAMBDATRAIN_DOCKER_DATA_ROOT:-/var/lib/lambdatrain-docker}
EXEC_ROOT=/run/lambdatrain-docker
STATE_DIR=/run/lambdatrain-docker-state
PIDFILE=$STATE_DIR/dockerd.pid
LOG=${LAMBDATRAIN_DOCKER_LOG:-/var/log/lambdatrain-dockerd.log}

say() { echo "engine: $*" >&2; }

engine_answers() { DOCKER_HOST=$1 timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
  if [ -n "${DOCKER_HOST:-}" ] && engine_answers "$DOCKER_HOST"; then
    say "using the running engine at DOCKER_HOST=$DOCKER_HOST"; echo "export DOCKER_HOST=$DOCKER_HOST"; return
  fi
  if [ -S /var/run/docker.sock ] && engine_answers unix:///var/run/docker.sock; then
    say "using the system engine at /var/run/docker.sock"; echo "export DOCKER_HOST=unix:///var/run/docker.sock"; return
  fi
  if [ -S "$SOCKET" ] && engine_answers "unix://$SOCKET"; then
    say "using the private engine already running at $SOCKET"; echo "export DOCKER_HOST=unix://$SOCKET"; return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "skip: no Docker engine answers and starting one needs root (make image-test skipped)"; return 3
  fi
  if ! command -v dockerd >/dev/null; then
    say "installing Debian's docker.io (apt-get install docker.io)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
  fi
  if ! command -v docker >/dev/null; then
    say "skip: dockerd is installed but the docker client is not"; return 3
  fi
  mkdir -p "$STATE_DIR" "$DATA_ROOT"
  sysctl -n net.ipv4.ip_forward >"$STATE_DIR/ip_forward"
  save_filter >"$STATE_DIR/filter.rules"
  ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort >"$STATE_DIR/links"
  say "starting dockerd (socket $SOCKET, data root $DATA_ROOT, log $LOG)"
  dockerd --host "unix://$SOCKET" --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" \
    --pidfile "$EXEC_ROOT.pid" --storage-driver overlay2 >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do
    if engine_answers "unix://$SOCKET"; then
      say "dockerd $(DOCKER_HOST=unix://$SOCKET docker version --format '{{.Server.Version}}') is up"
      echo "export DOCKER_HOST=unix://$SOCKET"; return
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      say "dockerd exited; last lines of $LOG:"; tail -5 "$LOG" >&2; stop; return 1
    fi
    sleep 0.5
  done
  say "dockerd did not answer within 30 s; see $LOG"; stop; return 1
}

# The packet filter as text: nft's whole ruleset (iptables-nft keeps docker's rules there), else iptables-save.
save_filter() {
  if command -v nft >/dev/null; then nft list ruleset; else iptables-save | { grep -v '^#' || true; }; fi
}

restore_filter() {
  if command -v nft >/dev/null; then
    nft flush ruleset
    if [ -s "$1" ]; then nft -f "$1"; fi
  else
    # Tables missing from the record were empty: flush them and drop docker's chains; restore the rest.
    for table in filter nat; do
      if ! grep -q "^\*$table" "$1"; then iptables -t "$table" -F; iptables -t "$table" -X; fi
    done
    iptables -P FORWARD ACCEPT
    iptables-restore <"$1"
  fi
}

stop() {
  if [ ! -f "$PIDFILE" ]; then
    say "no private engine was started here; nothing to undo"; return
  fi
  local pid; pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    DOCKER_HOST=unix://$SOCKET timeout 60 docker ps -q 2>/dev/null | xargs -r env DOCKER_HOST="unix://$SOCKET" docker rm -f >/dev/null 2>&1 || true
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then say "dockerd $pid ignored SIGTERM; sending SIGKILL"; kill -9 "$pid"; fi
  fi
  # Links dockerd created (docker0, veths left behind) go; links that existed before stay.
  ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort >"$STATE_DIR/links.after"
  comm -13 "$STATE_DIR/links" "$STATE_DIR/links.after" | while read -r link; do
    if ip link delete "$link" 2>/dev/null; then say "deleted link $link"; fi
  done
  restore_filter "$STATE_DIR/filter.rules"
  sysctl -q -w net.ipv4.ip_forward="$(cat "$STATE_DIR/ip_forward")"
  # dockerd leaves its network namespace mounted under the exec root.
  { grep -o " $EXEC_ROOT/[^ ]*" /proc/mounts || true; } | sort -r | while read -r mountpoint; do umount "$mountpoint"; done
  local ok=1
  diff <(save_filter) "$STATE_DIR/filter.rules" >/dev/null || { say "warning: the packet filter differs from before"; ok=0; }
  [ "$(sysctl -n net.ipv4.ip_forward)" = "$(cat "$STATE_DIR/ip_forward")" ] || { say "warning: ip_forward differs"; ok=0; }
  ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort | diff - "$STATE_DIR/links" >/dev/null \
    || { say "warning: the network links differ from before"; ok=0; }
  if [ "$ok" = 1 ]; then
    say "stopped; packet filter, ip_forward=$(sysctl -n net.ipv4.ip_forward) and links are as before"
  fi
  rm -rf "$STATE_DIR" "$EXEC_ROOT"
}

status() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "private dockerd $(cat "$PIDFILE") at unix://$SOCKET (recorded ip_forward=$(cat "$STATE_DIR/ip_forward"))"
  else
    echo "no private dockerd running"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
