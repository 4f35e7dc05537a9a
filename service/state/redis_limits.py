"""The policies' shared state on Redis: rate-limit buckets and breaker states, each changed only by one atomic Lua
script, and the shared result cache (`service/policy/shared.py` is the protocol this implements).

Why scripts of our own: the `limits` library's Redis storage pins `redis` < 8 (we run 8), and its `hit()` only says
yes or no, never how long to wait, which the "wait up to max_wait_s, in turn" semantics need; the Python circuit
breakers with a Redis store update it non-atomically (purgatory) or have none. A script runs alone in Redis, so
every replica sees one bucket and one breaker, and its clock is the server's `TIME` (one clock for the fleet), unless
a caller passes `now` (tests do).

Keys, under `state.prefix`: `rate:{tool}` (hash: tokens, at, issued), `breaker:{tool}` (hash: state, epoch,
consecutive, seq, opened_at, trial_until) with `breaker:{tool}:calls` and `:fails` (sorted sets of the window's
outcomes by time), `cache:{tool}:<sha256 of the input>` (JSON, with the policy's TTL). Idle buckets expire once full
again (a missing bucket means a full one); breakers a day after their last change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from service.policy.breaker import State
from service.policy.shared import BreakerAnswer, BreakerRequest, StateUnavailable, Take
from tools.policy import BreakerPolicy, RateLimitPolicy

# ARGV[1] is `now` in seconds, or empty for the server's clock. Numbers are stored with all their digits: Lua's own
# number-to-string keeps 14, which on a clock of 1.7e9 s drops the microseconds.
_PRELUDE = """
local function num(x) return string.format('%.17g', x) end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# A token bucket by reservation, as service/policy/limiter.py's: no token, and the caller takes the next one to come
# (the bucket goes into debt) unless its wait would pass max_wait (-1: reject mode, never wait). ARGV[5] callers in
# turn, each {code, wait, turn}: 0 go, 1 wait then go, -1 refused.
_TAKE = (
    _PRELUDE
    + """
local rate, burst, max_wait = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'issued')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
local issued = tonumber(b[3]) or 0
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local out = {}
for _ = 1, tonumber(ARGV[5]) do
  local code, wait = 0, 0
  if tokens >= 1 then
    tokens = tokens - 1
  else
    wait = (1 - tokens) / rate
    if max_wait < 0 or wait > max_wait then
      code = -1
    else
      code = 1
      tokens = tokens - 1
      issued = issued + 1
    end
  end
  out[#out + 1] = code
  out[#out + 1] = num(wait)
  out[#out + 1] = issued
end
redis.call('HSET', KEYS[1], 'tokens', num(tokens), 'at', num(now), 'issued', issued)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return out
"""
)

# A waiter cancelled before its turn: its token comes back if nobody reserved after it (their turns were counted
# behind this one's; given to a newcomer, the token would be taken twice).
_GIVE_BACK = """
local issued = tonumber(redis.call('HGET', KEYS[1], 'issued'))
if issued ~= nil and issued == tonumber(ARGV[1]) then
  redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', 1)
  redis.call('HSET', KEYS[1], 'issued', issued - 1)
  return 1
end
return 0
"""

# A breaker's requests in the order this process sent them, each answered {admitted, trial, epoch, before, state,
# cooldown left}, in one run of the script: allows before a call, verdicts after one, and trials' releases. The
# breaker's hash is read once and written once, so a batch costs one round trip and one write however many calls it
# carries, and stays as atomic as one request was. ARGV: now, cooldown, trial ttl, keep ms, window, threshold, rate,
# min calls, then (kind, epoch) per request: `a` allow, `s`/`f` success/failure, `r` release.
# Allow: open past its cool-down, half-open in a new epoch; half-open, the trial slot is free or its holder's deadline
# passed (then a new epoch, so a verdict of the lost trial no longer counts). A verdict counts only in the epoch its
# call was admitted in (breaker.py's docstring says why). A release frees the slot if its trial still holds it.
_BREAKER = (
    _PRELUDE
    + """
local cooldown, trial_ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local window, threshold, rate, min_calls = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local h = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'consecutive', 'seq', 'opened_at', 'trial_until')
local state = h[1] or 'closed'
local epoch = tonumber(h[2]) or 0
local consecutive = tonumber(h[3]) or 0
local seq = tonumber(h[4]) or 0
local opened_at = tonumber(h[5]) or 0
local trial_until = tonumber(h[6]) or 0
local written, counted = false, false
local out = {}
-- the batch's outcomes, added to the window's sets in one ZADD each (all at `now`) and trimmed once: before the
-- sets are counted, and at the end
local calls, fails = {}, {}
local function zadd(key, pairs)
  for i = 1, #pairs, 1000 do  -- unpack's results go on Lua's stack, which holds some 8000
    redis.call('ZADD', key, unpack(pairs, i, math.min(i + 999, #pairs)))
  end
end
local function add_outcomes()
  zadd(KEYS[2], calls)
  zadd(KEYS[3], fails)
  calls, fails = {}, {}
  local horizon = '(' .. num(now - window)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', horizon)
end
local function reply(admitted, trial, before)
  local left = 0
  if state == 'open' then left = cooldown - (now - opened_at) end
  out[#out + 1] = admitted
  out[#out + 1] = trial
  out[#out + 1] = epoch
  out[#out + 1] = before
  out[#out + 1] = state
  out[#out + 1] = num(left)
end
local function allow()
  local before = state
  if state == 'closed' then return reply(1, 0, before) end
  if state == 'open' then
    if cooldown - (now - opened_at) > 0 then return reply(0, 0, before) end
    state = 'half_open'
    epoch = epoch + 1
    trial_until = 0
    written = true
  end
  if trial_until > now then return reply(0, 0, before) end
  if trial_until > 0 then epoch = epoch + 1 end
  trial_until = now + trial_ttl
  written = true
  return reply(1, 1, before)
end
local function verdict(of, failed)
  local before = state
  if of ~= epoch then return reply(0, 0, before) end
  seq = seq + 1
  calls[#calls + 1] = num(now)
  calls[#calls + 1] = seq
  if failed then
    fails[#fails + 1] = num(now)
    fails[#fails + 1] = seq
  end
  if failed then
    consecutive = consecutive + 1
    local tripped = false
    if state == 'closed' then
      if consecutive >= threshold then
        tripped = true
      else
        add_outcomes()
        local n = redis.call('ZCARD', KEYS[2])
        tripped = n >= min_calls and redis.call('ZCARD', KEYS[3]) / n >= rate
      end
    end
    if state == 'half_open' or tripped then
      state = 'open'
      opened_at = now
      trial_until = 0
    end
  else
    consecutive = 0
    if state == 'half_open' then
      redis.call('DEL', KEYS[2], KEYS[3])
      calls, fails = {}, {}
      state = 'closed'
      trial_until = 0
    end
  end
  if state ~= before then epoch = epoch + 1 end
  written, counted = true, true
  return reply(1, 0, before)
end
for i = 9, #ARGV, 2 do
  local kind, of = ARGV[i], tonumber(ARGV[i + 1])
  if kind == 'a' then
    allow()
  elseif kind == 'r' then
    if state == 'half_open' and of == epoch then
      trial_until = 0
      written = true
    end
    reply(0, 0, state)
  else
    verdict(of, kind == 'f')
  end
end
if written then
  redis.call('HSET', KEYS[1], 'state', state, 'epoch', epoch, 'consecutive', consecutive, 'seq', seq,
    'opened_at', num(opened_at), 'trial_until', num(trial_until))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
if counted then
  add_outcomes()
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
return out
"""
)

_KEEP_BREAKER_S = 86400.0
_STATES = {s.value: s for s in State}
_KINDS = {"allow": "a", "success": "s", "failure": "f", "release": "r"}


def _now(now: float | None) -> str:
    return "" if now is None else repr(now)


def _answer(reply: list[Any]) -> BreakerAnswer:
    admitted, trial, epoch, before, state, left = reply
    return BreakerAnswer(
        admitted=bool(admitted),
        trial=bool(trial),
        epoch=int(epoch),
        before=_STATES[before.decode()],
        state=_STATES[state.decode()],
        cooldown_left_s=max(float(left), 0.0),
    )


class RedisPolicyState:
    """`SharedPolicyState` on one Redis client (which it closes). Every Redis error raises `StateUnavailable`."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._take = client.register_script(_TAKE)
        self._give_back = client.register_script(_GIVE_BACK)
        self._breaker = client.register_script(_BREAKER)

    def _rate_key(self, name: str) -> str:
        return f"{self.prefix}rate:{{{name}}}"  # the braces: a cluster hash tag, a tool's keys in one slot

    def _breaker_keys(self, name: str) -> list[str]:
        key = f"{self.prefix}breaker:{{{name}}}"
        return [key, f"{key}:calls", f"{key}:fails"]

    def _cache_key(self, name: str, key: str) -> str:
        return f"{self.prefix}cache:{{{name}}}:{hashlib.sha256(key.encode()).hexdigest()}"

    async def take(self, name: str, policy: RateLimitPolicy, now: float | None, count: int) -> list[Take]:
        max_wait = -1.0 if policy.mode == "reject" else policy.max_wait_s
        args: list[str | int] = [_now(now), repr(policy.rate_per_s), policy.burst, repr(max_wait), count]
        try:
            reply = await self._take(keys=[self._rate_key(name)], args=args)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return [
            Take(None) if code < 0 else Take(float(wait) if code else 0.0, int(turn))
            for code, wait, turn in zip(reply[::3], reply[1::3], reply[2::3], strict=True)
        ]

    async def give_back(self, name: str, turn: int) -> None:
        try:
            await self._give_back(keys=[self._rate_key(name)], args=[turn])
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc

    async def breaker(
        self,
        name: str,
        policy: BreakerPolicy,
        trial_ttl_s: float,
        now: float | None,
        requests: Sequence[BreakerRequest],
    ) -> list[BreakerAnswer]:
        args: list[str | int] = [
            _now(now),
            repr(policy.cooldown_s),
            repr(trial_ttl_s),
            _keep_ms(policy),
            repr(policy.window_s),
            policy.failure_threshold,
            repr(policy.failure_rate),
            policy.min_calls,
        ]
        for request in requests:
            args += (_KINDS[request.kind], request.epoch)
        try:
            reply = await self._breaker(keys=self._breaker_keys(name), args=args)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return [_answer(reply[i : i + 6]) for i in range(0, len(reply), 6)]

    async def cache_get(self, name: str, key: str) -> bytes | None:
        try:
            value = await self.client.get(self._cache_key(name, key))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return value.encode() if isinstance(value, str) else value

    async def cache_put(self, name: str, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self.client.set(self._cache_key(name, key), value, px=max(1, round(ttl_s * 1000)))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc

    async def aclose(self) -> None:
        await self.client.aclose()


def _keep_ms(policy: BreakerPolicy) -> int:
    """How long a breaker's keys outlive its last change: a day, or longer than its window and cool-down."""
    return round(max(_KEEP_BREAKER_S, 2 * (policy.window_s + policy.cooldown_s)) * 1000)
