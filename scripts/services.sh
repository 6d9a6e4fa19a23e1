#!/usr/bin/env bash
# Make sure the local services the demo and the tests use are running, and that PostgreSQL has
# wal_level=logical (CDC mode needs it). Starts whatever is down with this machine's own commands;
# elsewhere (e.g. `docker compose up -d postgres rabbitmq nats redis mosquitto`), it only checks.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2
  for _ in $(seq 1 120); do port_open "$port" && return 0; sleep 0.5; done
  echo "services: $name did not come up on port $port" >&2
  return 1
}

start_if_down() {
  local name=$1 port=$2; shift 2
  port_open "$port" && return 0
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "services: $name is not running on port $port and '$1' is not installed" >&2
    return 1
  fi
  echo "services: starting $name"
  "$@" >/dev/null 2>&1 || true
  wait_port "$name" "$port"
}

pg_cluster=$(ls /etc/postgresql 2>/dev/null | head -n1 || true)
start_if_down PostgreSQL 5432 pg_ctlcluster --skip-systemctl-redirect "${pg_cluster:-15}" main start
start_if_down RabbitMQ 5672 rabbitmq-server -detached
start_if_down Redis 6379 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
  --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
start_if_down Mosquitto 1883 mosquitto -d -c /etc/mosquitto/mosquitto.conf
start_if_down NATS 4222 start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server \
  -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log

# RabbitMQ accepts TCP before the app is fully up.
if command -v rabbitmqctl >/dev/null 2>&1; then
  rabbitmqctl await_startup >/dev/null 2>&1 || { rabbitmqctl start_app >/dev/null 2>&1 || true; rabbitmqctl await_startup >/dev/null; }
  # `consume --ordered` routes by aggregate through the consistent-hash exchange (docs/consumers.md).
  rabbitmq-plugins is_enabled rabbitmq_consistent_hash_exchange >/dev/null 2>&1 || rabbitmq-plugins enable rabbitmq_consistent_hash_exchange >/dev/null
fi

psql_admin() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc "$1"; }
if [ "$(psql_admin 'SHOW wal_level')" != "logical" ]; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "services: switching PostgreSQL to wal_level=logical (restart)"
    psql_admin "ALTER SYSTEM SET wal_level = logical"
    pg_ctlcluster --skip-systemctl-redirect "${pg_cluster:-15}" main restart
    wait_port PostgreSQL 5432
  else
    echo "services: PostgreSQL needs wal_level=logical for CDC mode" >&2
    exit 1
  fi
fi
