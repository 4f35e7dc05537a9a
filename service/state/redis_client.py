"""Redis for the run-state store: the client `state` configures, and the Lua scripts that make admission and lease
renewal atomic (no library offers these: they are the store's own rules, a few lines each)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.config import StateConfig

# Idempotency key, then quotas, then the record: one round trip and atomic, so no two replicas both start a run for
# one key, nor both let in a caller's last allowed run. Times are Redis's (TIME), one clock for the fleet.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {'existing', existing} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local most = tonumber(ARGV[4])
if most >= 0 and redis.call('ZCARD', KEYS[3]) >= most then return {'busy', ARGV[4]} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 60000)
local per_minute = tonumber(ARGV[5])
if per_minute >= 0 and redis.call('ZCARD', KEYS[4]) >= per_minute then
  local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  return {'rate', tostring(tonumber(oldest[2]) + 60000 - now)}
end
local lease = tonumber(ARGV[6])
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) end
redis.call('ZADD', KEYS[3], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[3], lease)
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('PEXPIRE', KEYS[4], 60000)
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {'ok'}
"""

# A lease renewed: the run's score moves on, if the set still has it or lost it (Redis restarted), and the set lives on.
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""

# A cancel's mark on the record and its message to the owner the record names at that moment, in one step: a process
# that revives the run names itself owner as it reads the mark (`RedisRunStore.revive`), so either it reads this mark
# or this message reaches it. (The message went to the owner the canceller had read, maybe the dead one a moment
# before a peer took the run over: an outside finding, the cancel answered OK and lost.)
# KEYS: the run's hash. ARGV: mode (now | after_turn), channel prefix, run id. Returns the owner told, or nil.
CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] == 'now' or redis.call('HGET', KEYS[1], 'cancel_requested') ~= 'now' then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[1])  -- as MARK: an after_turn never replaces a now
end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then redis.call('PUBLISH', ARGV[2] .. owner, ARGV[3] .. ' ' .. ARGV[1]) end
return owner
"""

# A CancelRun of a run this process drives, kept on its record for whoever revives it should this process die
# (`RedisRunStore.mark_cancel`); never on a record not shipped yet (its first shipment writes it whole), and an
# after_turn mark never replaces a now one. KEYS: the run's hash. ARGV: mode.
MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == 'now' or redis.call('HGET', KEYS[1], 'cancel_requested') ~= 'now' then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[1])
end
return 1
"""

# A run taken over (`RedisRunStore.revive`, in the transaction that reads it): the record names this process owner at
# once, not with its first shipment a moment later, so that a CancelRun from then on reaches it (CANCEL). A run with no
# record yet gets none here (its first shipment writes it whole).
TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'owner', ARGV[1]) end
return 0
"""


# What GetRun reads: the record, and how far the run's stream goes (the record's last_seq is written only when the
# run's state changes, not with every shipment). Only the last entry's id comes back, not its events. Flagged
# no-writes (Redis 7): it runs on a read-only replica, and while writes are paused.
READ = """#!lua flags=no-writes
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local seq = ''
if last[1] then seq = last[1][1] end
return {fields, seq}
"""


def connect(config: StateConfig, *, read_timeout_s: float | None = None) -> redis.Redis:
    """A client for `config.url`; `read_timeout_s` longer than the command timeout for blocking reads."""
    options: dict[str, Any] = {
        "socket_timeout": read_timeout_s or config.timeout_s,
        "socket_connect_timeout": config.timeout_s,
        "socket_keepalive": True,
        # one quick retry covers a pooled connection that Redis closed (a restart); more would only delay the
        # failure a caller is told of, and the shipper has a backoff of its own
        "retry": Retry(NoBackoff(), 1),
    }
    if config.password_file is not None:
        options["password"] = config.password_file.read_text().strip()
    if config.url.startswith("rediss://"):
        options["ssl_ca_certs"] = None if config.tls_ca_file is None else str(config.tls_ca_file)
        options["ssl_certfile"] = None if config.tls_cert_file is None else str(config.tls_cert_file)
        options["ssl_keyfile"] = None if config.tls_key_file is None else str(config.tls_key_file)
    # A pool that makes a caller wait for a free connection (up to timeout_s) rather than fail: redis-py's default
    # pool raises "Too many connections" past its cap, which a burst of run starts reached at C=1000 and which then
    # read as Redis being unreachable (runs refused UNAVAILABLE, the store marked down).
    pool = redis.BlockingConnectionPool.from_url(
        config.url, max_connections=config.max_connections, timeout=config.timeout_s, **options
    )
    pool.connection_class = _PACKED_IN_C.get(pool.connection_class, pool.connection_class)
    return redis.Redis.from_pool(pool)


try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # an older hiredis, or none: redis-py's own packing
    _hiredis_pack = None  # type: ignore[assignment]


class _PackInC:
    """Commands packed by hiredis, in C, as redis-py's synchronous client does (its `HiredisRespSerializer`); its
    asyncio client packs them in Python, argument by argument: at C=1000 that was a fifth of a Redis replica's CPU
    on the start path (the runs' first shipments, bench/startcost.py --state)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # "CONFIG GET": a command of several words, as redis-py splits it
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [_hiredis_pack(args)]
        except TypeError:  # a memoryview, or a value of no Redis type: redis-py packs it, or says what is wrong
            return super().pack_command(*args)  # type: ignore[misc,no-any-return]


class _Packed(_PackInC, Connection):
    pass


class _PackedSSL(_PackInC, SSLConnection):
    pass


class _PackedUnix(_PackInC, UnixDomainSocketConnection):
    pass


_PACKED_IN_C: dict[type, type] = (
    {}
    if _hiredis_pack is None
    else {Connection: _Packed, SSLConnection: _PackedSSL, UnixDomainSocketConnection: _PackedUnix}
)
