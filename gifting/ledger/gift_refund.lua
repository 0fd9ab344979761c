-- gift_refund: a gift whose room ended between its debit and its credit
-- (gift_credit.lua answered 2) gives the coins back, in the SENDER's partition:
-- at most once (it takes the outbox entry away), as if the gift never was
-- (the sender's history entry and idempotency key go too, so a retry by key
-- is answered not_live).
--
-- KEYS[1]  <Ps>:bal   ARGV[1] transfer
-- Returns 1 (refunded now) or 0 (no such outbox entry: refunded before).

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local raw = redis.call('HGET', P .. ':out', ARGV[1])
if not raw then
  return 0
end
local e = cmsgpack.unpack(raw)
redis.call('HDEL', P .. ':out', ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HINCRBY', bal, '~transit', -e.cost)
local left = redis.call('HINCRBY', bal, e.sender, e.cost)
redis.call('XADD', P .. ':journal', '*', 't', e.t, 'kind', 'gift_refund', 'ms', now,
  'post', string.format('~transit=%d;%s=%d', -e.cost, e.sender, e.cost), 'room', e.room)
redis.call('ZREMRANGEBYSCORE', P .. ':hist:' .. e.sender, e.t, e.t)
redis.call('DEL', e.idem)
if e.spent ~= '' and redis.call('EXISTS', e.spent) == 1 then
  redis.call('DECRBY', e.spent, e.cost)
end
redis.call('SPUBLISH', P .. ':user:' .. e.sender, cmsgpack.pack({'balance', left, ''}))
return 1
