-- effect: a member of a live room pays for an effect (an animation), all of it to the platform.
--
-- KEYS[1]  <P>:bal  (the balances hash; <P> is the hash-tagged prefix, e.g. "{g}",
--          from which every other key of this call is derived, so all share one slot)
-- ARGV[1]  payer user id           ARGV[2]  room (= creator user id)
-- ARGV[3]  effect id               ARGV[4]  idempotency key
-- ARGV[5]  payer display name      ARGV[6]  payer avatar URL ("" for none)
-- ARGV[7]  "1" when the hub's rate limiter refused this move, else "0"
-- ARGV[8]  connection id of the caller (its balance event is skipped there)
-- ARGV[9]  seconds an idempotency key is remembered
-- ARGV[10] coins the payer may spend per UTC day (0: no cap; shared with gifts)
--
-- The hub has checked the fields, that the effect is in its catalog and that the
-- caller joined the room. Returns {transfer, payer_balance_after, duplicate(0|1)}
-- or an error reply "<code> <message>" with code one of
-- unknown_item, not_live, rate_limited, conflict, insufficient_funds, spend_limit.
-- Nothing is written before every check has passed.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local payer, room, effect, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local name, avatar = ARGV[5], ARGV[6]

local price = redis.call('HGET', P .. ':effects', effect)
if not price then
  return redis.error_reply('unknown_item no such effect: ' .. effect)
end
price = tonumber(price)

local roomkey = P .. ':room:' .. room
local state = redis.call('HMGET', roomkey, 'live', 'session')
if state[1] ~= '1' then
  return redis.error_reply('not_live room ' .. room .. ' is not live')
end
local session = tonumber(state[2])

if ARGV[7] == '1' then
  return redis.error_reply('rate_limited too many coin moves, slow down')
end

-- "effect:" cannot begin a gift's body (room ids have no ':'), so a key used
-- for a gift and then for an effect (or back) is a conflict, never a replay.
local body = 'effect:' .. room .. '|' .. effect
local idem = P .. ':idem:' .. payer .. ':' .. key
local seen = redis.call('HMGET', idem, 'body', 'transfer', 'coins')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict key already used for a different move')
  end
  return {tonumber(seen[2]), tonumber(seen[3]), 1}
end

local have = tonumber(redis.call('HGET', bal, payer) or '0')
if have < price then
  return redis.error_reply(string.format('insufficient_funds need %d coins, have %d', price, have))
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[10] or '0')
local spentKey = P .. ':spent:' .. payer .. ':' .. math.floor(tonumber(t[1]) / 86400)
if cap > 0 then
  local spent = tonumber(redis.call('GET', spentKey) or '0')
  if spent + price > cap then
    return redis.error_reply(string.format(
      'spend_limit daily limit of %d coins: %d spent today, this effect costs %d', cap, spent, price))
  end
end

-- Every check passed: from here on, write.
local left = redis.call('HINCRBY', bal, payer, -price)
redis.call('HINCRBY', bal, '~platform', price)
local transfer = redis.call('INCR', P .. ':xfer')

local post = string.format('%s=%d;~platform=%d', payer, -price, price)
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'effect', 'ms', now,
  'post', post, 'room', room, 'session', session, 'effect', effect)
redis.call('HSET', P .. ':posts', transfer, 'effect|' .. post)

redis.call('ZADD', P .. ':hist:' .. payer, transfer, cmsgpack.pack({kind = 'effect',
  transfer = transfer, time = now, room = room, effect = effect, coins = -price}))

if cap > 0 then
  redis.call('INCRBY', spentKey, price)
  redis.call('EXPIRE', spentKey, 172800)
end

redis.call('HSET', idem, 'body', body, 'transfer', transfer, 'coins', left)
redis.call('EXPIRE', idem, tonumber(ARGV[9]))

-- The room's one seq counter, shared with bubbles: a viewer who counts seq sees any loss.
local seq = redis.call('HINCRBY', roomkey, 'seq', 1)

-- Publish last: the event announces only what is already committed above.
local from = {user = payer, name = name, avatar = cjson.null}
if avatar ~= '' then
  from.avatar = avatar
end
local ev = {ev = 'effect', room = room, session = session, seq = seq, from = from,
  effect = effect, time = now}
redis.call('SPUBLISH', P .. ':room:' .. room, cmsgpack.pack({'event', ev}))
redis.call('SPUBLISH', P .. ':user:' .. payer, cmsgpack.pack({'balance', left, ARGV[8]}))

return {transfer, left, 0}
