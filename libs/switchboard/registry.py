"""Agent discovery on Redis: who is alive, what they serve, how loaded they are.

The registry service is the only writer (it consumes agents' heartbeats); the dispatcher and the api
read. An agent is live while its last heartbeat is younger than `agent_lost_after_s`; readers judge
that themselves, so a stalled registry cannot make a dead agent look alive.

Keys (`{ns}` the namespace), written together by one script, so they always agree:
  {ns}:agents                     hash: name → the agent's record (JSON), as its last heartbeat gave it
  {ns}:agents:names               zset: every name, score 0 (ZRANGEBYLEX pages by name)
  {ns}:agents:cap:{capability}    zset: the names serving a capability, score 0
  {ns}:agents:beats               zset: name → its last heartbeat, 0 once marked lost (status without the record)
All of it is derived from heartbeats: lost with Redis, it comes back as agents beat again. The indexes
are rebuilt from the hash if they ever disagree with it (`reindex`), as after an upgrade that added them.
"""

from __future__ import annotations

import time

import orjson
import redis.asyncio as aioredis

from switchboard.settings import Settings

STATUSES = ("alive", "lost")
MAX_PAGE = 1000

# KEYS: hash, names, beats. ARGV: name, record, beat score, capability key prefix, capabilities...
# Index keys of capabilities are built in the script (as switchboard.deps does): Redis is not clustered.
_UPSERT = """
local name, prefix = ARGV[1], ARGV[4]
local keep = {}
for i = 5, #ARGV do keep[ARGV[i]] = true end
local old = redis.call('HGET', KEYS[1], name)
if old then
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' and type(rec.capabilities) == 'table' then
    for _, c in ipairs(rec.capabilities) do
      if type(c) == 'string' and not keep[c] then redis.call('ZREM', prefix .. c, name) end
    end
  end
end
redis.call('HSET', KEYS[1], name, ARGV[2])
redis.call('ZADD', KEYS[2], 0, name)
redis.call('ZADD', KEYS[3], ARGV[3], name)
for i = 5, #ARGV do redis.call('ZADD', prefix .. ARGV[i], 0, name) end
return 1
"""

# KEYS: hash, names, beats. ARGV: name, capability key prefix, '' or the JSON [host, pid] that must match.
_REMOVE = """
local name, prefix = ARGV[1], ARGV[2]
local old = redis.call('HGET', KEYS[1], name)
if old then
  local ok, rec = pcall(cjson.decode, old)
  if not ok or type(rec) ~= 'table' then rec = {} end
  if ARGV[3] ~= '' then
    local want = cjson.decode(ARGV[3])
    local function v(x) if x == nil then return cjson.null end return x end
    if v(rec.host) ~= v(want[1]) or v(rec.pid) ~= v(want[2]) then return 0 end
  end
  if type(rec.capabilities) == 'table' then
    for _, c in ipairs(rec.capabilities) do
      if type(c) == 'string' then redis.call('ZREM', prefix .. c, name) end
    end
  end
  redis.call('HDEL', KEYS[1], name)
end
redis.call('ZREM', KEYS[2], name)
redis.call('ZREM', KEYS[3], name)
return 1
"""

# KEYS: hash, names, beats. ARGV: capability key prefix. Adds every record to the indexes and drops
# the names that have no record. (Capability index entries left stale are skipped by readers.)
_REINDEX = """
local prefix = ARGV[1]
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local name = all[i]
  local ok, rec = pcall(cjson.decode, all[i + 1])
  if ok and type(rec) == 'table' then
    redis.call('ZADD', KEYS[2], 0, name)
    local beat = 0
    if rec.status == 'alive' and type(rec.last_heartbeat) == 'number' then beat = rec.last_heartbeat end
    redis.call('ZADD', KEYS[3], beat, name)
    if type(rec.capabilities) == 'table' then
      for _, c in ipairs(rec.capabilities) do
        if type(c) == 'string' then redis.call('ZADD', prefix .. c, 0, name) end
      end
    end
  end
end
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  for _, name in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if redis.call('HEXISTS', KEYS[1], name) == 0 then redis.call('ZREM', key, name) end
  end
end
return redis.call('ZCARD', KEYS[2])
"""


def _beat(agent: dict) -> float:
    """The score in the beats index: the last heartbeat of an agent recorded alive, 0 for one marked lost."""
    beat = agent.get("last_heartbeat")
    return float(beat) if agent.get("status") == "alive" and isinstance(beat, int | float) else 0.0


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


class RegistryClient:
    def __init__(self, redis: aioredis.Redis, settings: Settings):
        self.redis = redis
        self.key = f"{settings.namespace}:agents"
        self.names_key = f"{self.key}:names"
        self.beats_key = f"{self.key}:beats"
        self.cap_prefix = f"{self.key}:cap:"
        self.lost_after_s = settings.agent_lost_after_s
        self._keys = [self.key, self.names_key, self.beats_key]
        self._upsert = redis.register_script(_UPSERT)
        self._remove = redis.register_script(_REMOVE)
        self._reindex = redis.register_script(_REINDEX)

    def capability_key(self, capability: str) -> str:
        return self.cap_prefix + capability

    def _upsert_args(self, agent: dict) -> list:
        capabilities = sorted({c for c in agent.get("capabilities") or () if isinstance(c, str)})
        return [agent["name"], orjson.dumps(agent), _beat(agent), self.cap_prefix, *capabilities]

    async def upsert(self, agent: dict) -> None:
        await self._upsert(keys=self._keys, args=self._upsert_args(agent))

    async def upsert_many(self, agents: list[dict]) -> None:
        """upsert for many agents (the heartbeat of a host of agents) in one round trip; each one atomic."""
        if not agents:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for agent in agents:
                await self._upsert(keys=self._keys, args=self._upsert_args(agent), client=pipe)
            await pipe.execute()

    async def remove(self, name: str, *, instance: tuple | None = None) -> None:
        """Forgets an agent; with `instance` (host, pid), only if its latest heartbeat came from there.

        Replicas of one agent (pods of a Deployment, `--scale`) share its name and queues: one replica
        that stops must not take the name from the others."""
        await self._remove(keys=self._keys, args=[name, self.cap_prefix,
                                                  orjson.dumps(list(instance)) if instance is not None else ""])

    async def reindex(self) -> int:
        """Rebuilds the indexes from the records; returns how many agents they hold."""
        return int(await self._reindex(keys=self._keys, args=[self.cap_prefix]))

    def _judged(self, agent: dict, now: float) -> dict:
        if agent.get("status") == "alive" and now - agent["last_heartbeat"] > self.lost_after_s:
            agent["status"] = "lost"
        return agent

    async def agents(self) -> list[dict]:
        now = time.time()
        out = [self._judged(orjson.loads(raw), now) for raw in (await self.redis.hgetall(self.key)).values()]
        return sorted(out, key=lambda a: a["name"])

    async def page(self, *, limit: int = 100, after: str | None = None, capability: str | None = None,
                   status: str | None = None) -> tuple[list[dict], str | None]:
        """One page of agents by name, after the name `after`: those serving `capability`, in `status`.
        Returns the agents and the cursor of the next page (None on the last page). Reads the records of
        the page only: the name indexes give the order and the filter by capability, the beats index the
        status."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}")
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        async with self.redis.pipeline(transaction=True) as pipe:  # one moment: no spurious mismatch
            pipe.hlen(self.key)
            pipe.zcard(self.names_key)
            records, indexed = await pipe.execute()
        if records != indexed:  # indexes missing or stale (an upgrade, a partial loss): rebuild them
            await self.reindex()
        now = time.time()
        index = self.capability_key(capability) if capability is not None else self.names_key
        start = "(" + after if after is not None else "-"
        chunk = limit + 1 if status is None else max(limit + 1, 256)
        names: list = []  # the matching names, up to one more than the page (there is a next page)
        while len(names) <= limit:
            scanned = await self.redis.zrangebylex(index, start, "+", start=0, num=chunk)
            if status is None:
                names += scanned
            elif scanned:
                for name, beat in zip(scanned, await self.redis.zmscore(self.beats_key, scanned), strict=True):
                    alive = bool(beat) and now - beat <= self.lost_after_s
                    if alive == (status == "alive"):
                        names.append(name)
            if len(scanned) < chunk:
                break
            start = "(" + _text(scanned[-1])
        more = len(names) > limit
        names = names[:limit]
        raws = await self.redis.hmget(self.key, names) if names else []
        out = []
        for raw in raws:
            if raw is None:  # removed since the index was read
                continue
            agent = self._judged(orjson.loads(raw), now)
            if capability is not None and capability not in agent.get("capabilities", ()):
                continue  # an index entry left stale
            if status is not None and agent["status"] != status:
                continue
            out.append(agent)
        return out, _text(names[-1]) if more else None

    async def live_capabilities(self) -> set[str]:
        return {c for a in await self.agents() if a["status"] == "alive" for c in a["capabilities"]}

    async def live_agents(self) -> set[str]:
        return {a["name"] for a in await self.agents() if a["status"] == "alive"}
