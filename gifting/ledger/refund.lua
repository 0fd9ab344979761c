-- refund: a seller gives back what an order's purchase moved, by a compensating transfer.
--
-- KEYS[1]  <P>:bal  (the balances hash; <P> is the hash-tagged prefix, e.g. "{g}",
--          from which every other key of this call is derived, so all share one slot)
-- ARGV[1]  caller user id (must own the order's shop)
-- ARGV[2]  order id                ARGV[3]  idempotency key
-- ARGV[4]  connection id of the caller (its balance event is skipped there)
-- ARGV[5]  seconds an idempotency key is remembered
--
-- Moves back exactly what the purchase moved (the seller's share and the
-- platform's part to the buyer), puts the units back in stock and marks the
-- order "refunded"; the purchase's journal entry is never edited. The purchase
-- is recorded in P:reversed as undone by this refund, so an admin reversal
-- cannot undo it a second time, and a purchase an admin already reversed
-- cannot be refunded (both: conflict).
--
-- Returns {order, seller_balance_after, duplicate(0|1)} or an error reply
-- "<code> <message>" with code one of (in this order) unknown_item, forbidden,
-- conflict (key reused for another move, or the order already refunded or
-- reversed), insufficient_funds (the seller's balance, or the platform's,
-- cannot cover its part). Nothing is written before every check has passed.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local caller, order, key = ARGV[1], ARGV[2], ARGV[3]

local okey = P .. ':order:' .. order
local o = redis.call('HMGET', okey, 'shop', 'buyer', 'product', 'count', 'coins', 'earned',
  'fee', 'status', 'transfer')
if not o[1] then
  return redis.error_reply('unknown_item no order ' .. order)
end
local shop, buyer, product = o[1], o[2], o[3]
local count, total, earned, fee = tonumber(o[4]), tonumber(o[5]), tonumber(o[6]), tonumber(o[7])
local status, paid_by = o[8], o[9]

if caller ~= shop then
  return redis.error_reply('forbidden only the shop owner can refund an order')
end

-- "refund:" cannot begin a gift's body (room ids have no ':'), see effect.lua.
local body = 'refund:' .. order
local idem = P .. ':idem:' .. caller .. ':' .. key
local seen = redis.call('HMGET', idem, 'body', 'order', 'coins')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict key already used for a different move')
  end
  return {tonumber(seen[2]), tonumber(seen[3]), 1}
end

if status ~= 'paid' then
  return redis.error_reply('conflict order ' .. order .. ' is already ' .. status)
end
local by = redis.call('HGET', P .. ':reversed', paid_by)
if by then
  return redis.error_reply('conflict the payment of order ' .. order .. ' was reversed by ' .. by)
end

local have = tonumber(redis.call('HGET', bal, shop) or '0')
if have < earned then
  return redis.error_reply(string.format(
    'insufficient_funds refunding order %s needs %d coins, have %d', order, earned, have))
end
local platform = tonumber(redis.call('HGET', bal, '~platform') or '0')
if platform < fee then
  return redis.error_reply('insufficient_funds the platform cannot cover its part of the refund')
end

-- Every check passed: from here on, write.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local buyer_bal = redis.call('HINCRBY', bal, buyer, total)
local seller_bal = redis.call('HINCRBY', bal, shop, -earned)
if fee > 0 then
  redis.call('HINCRBY', bal, '~platform', -fee)
end
local transfer = redis.call('INCR', P .. ':xfer')
redis.call('HINCRBY', P .. ':prod:' .. shop .. ':' .. product, 'stock', count)

local post = string.format('%s=%d;%s=%d;~platform=%d', buyer, total, shop, -earned, -fee)
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'refund', 'ms', now,
  'post', post, 'order', order, 'shop', shop, 'product', product, 'count', count,
  'buyer', buyer, 'of', paid_by)
redis.call('HSET', P .. ':posts', transfer, 'refund|' .. post)
redis.call('HSET', P .. ':reversed', paid_by, transfer)
redis.call('HSET', okey, 'status', 'refunded', 'refund', transfer)

local h = {kind = 'refund', transfer = transfer, order = tonumber(order), shop = shop,
  product = product, count = count, time = now, coins = total}
redis.call('ZADD', P .. ':hist:' .. buyer, transfer, cmsgpack.pack(h))
h.coins = -earned
h.buyer = buyer
redis.call('ZADD', P .. ':hist:' .. shop, transfer, cmsgpack.pack(h))

redis.call('HSET', idem, 'body', body, 'order', order, 'coins', seller_bal, 'transfer', transfer)
redis.call('EXPIRE', idem, tonumber(ARGV[5]))

redis.call('SPUBLISH', P .. ':user:' .. buyer, cmsgpack.pack({'balance', buyer_bal, ''}))
redis.call('SPUBLISH', P .. ':user:' .. shop, cmsgpack.pack({'balance', seller_bal, ARGV[4]}))

return {tonumber(order), seller_bal, 0}
