-- buy: a user buys `count` units of a product from another user's shop, atomically.
--
-- KEYS[1]  <P>:bal  (the balances hash; <P> is the hash-tagged prefix, e.g. "{g}",
--          from which every other key of this call is derived, so all share one slot)
-- ARGV[1]  buyer user id           ARGV[2]  shop (= seller user id)
-- ARGV[3]  product id              ARGV[4]  count (1-99, checked by the hub)
-- ARGV[5]  unit price the buyer was shown (coins)
-- ARGV[6]  idempotency key         ARGV[7]  buyer display name
-- ARGV[8]  buyer avatar URL ("" for none)
-- ARGV[9]  seller share, percent (0-100) of the total, rounded down
-- ARGV[10] "1" when the hub's rate limiter refused this move, else "0"
-- ARGV[11] connection id of the caller (its balance event is skipped there)
-- ARGV[12] seconds an idempotency key is remembered
-- ARGV[13] coins the buyer may spend per UTC day (0: no cap; shared with gifts)
--
-- One step: the stock goes down by count, the buyer pays price * count, the
-- seller gets their share, the platform the rest, and the order is recorded
-- as "paid". Returns {order, buyer_balance_after, stock_left, duplicate(0|1)}
-- or an error reply "<code> <message>" with code one of (in this order)
-- unknown_item, forbidden, rate_limited, conflict, price_changed, sold_out,
-- insufficient_funds, spend_limit. Nothing is written before every check has passed.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local buyer, shop, product = ARGV[1], ARGV[2], ARGV[3]
local count, shown = tonumber(ARGV[4]), tonumber(ARGV[5])
local key, name, avatar = ARGV[6], ARGV[7], ARGV[8]
local share_pct = tonumber(ARGV[9])

local pkey = P .. ':prod:' .. shop .. ':' .. product
local p = redis.call('HMGET', pkey, 'name', 'coins', 'stock')
if not p[1] then
  return redis.error_reply('unknown_item no product ' .. product .. ' in shop ' .. shop)
end
local pname, price, stock = p[1], tonumber(p[2]), tonumber(p[3])

if buyer == shop then
  return redis.error_reply('forbidden you cannot buy from your own shop')
end

if ARGV[10] == '1' then
  return redis.error_reply('rate_limited too many coin moves, slow down')
end

-- "buy:" cannot begin a gift's body (room ids have no ':'), see effect.lua.
local body = 'buy:' .. shop .. '|' .. product .. '|' .. ARGV[4] .. '|' .. ARGV[5]
local idem = P .. ':idem:' .. buyer .. ':' .. key
local seen = redis.call('HMGET', idem, 'body', 'order', 'coins', 'stock')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict key already used for a different move')
  end
  return {tonumber(seen[2]), tonumber(seen[3]), tonumber(seen[4]), 1}
end

if price ~= shown then
  return redis.error_reply(string.format(
    'price_changed the price of %s is now %d coins, not %d', product, price, shown))
end

if stock < count then
  return redis.error_reply(string.format('sold_out %d left of %s, asked for %d', stock, product, count))
end

local total = price * count
local have = tonumber(redis.call('HGET', bal, buyer) or '0')
if have < total then
  return redis.error_reply(string.format('insufficient_funds need %d coins, have %d', total, have))
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[13] or '0')
local spentKey = P .. ':spent:' .. buyer .. ':' .. math.floor(tonumber(t[1]) / 86400)
if cap > 0 then
  local spent = tonumber(redis.call('GET', spentKey) or '0')
  if spent + total > cap then
    return redis.error_reply(string.format(
      'spend_limit daily limit of %d coins: %d spent today, this buy costs %d', cap, spent, total))
  end
end

-- Every check passed: from here on, write.
local earned = math.floor(total * share_pct / 100)
local fee = total - earned

local left = redis.call('HINCRBY', pkey, 'stock', -count)
local buyer_bal = redis.call('HINCRBY', bal, buyer, -total)
local seller_bal = redis.call('HINCRBY', bal, shop, earned)
if fee > 0 then
  redis.call('HINCRBY', bal, '~platform', fee)
end
local transfer = redis.call('INCR', P .. ':xfer')
local order = redis.call('INCR', P .. ':order')

local post = string.format('%s=%d;%s=%d;~platform=%d', buyer, -total, shop, earned, fee)
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'purchase', 'ms', now,
  'post', post, 'order', order, 'shop', shop, 'product', product, 'count', count,
  'buyer', buyer)
redis.call('HSET', P .. ':posts', transfer, 'purchase|' .. post)

redis.call('HSET', P .. ':order:' .. order, 'shop', shop, 'buyer', buyer, 'buyer_name', name,
  'product', product, 'count', count, 'coins', total, 'earned', earned, 'fee', fee,
  'status', 'paid', 'time', now, 'transfer', transfer)
redis.call('ZADD', P .. ':orders:buyer:' .. buyer, order, order)
redis.call('ZADD', P .. ':orders:seller:' .. shop, order, order)

local h = {kind = 'purchase', transfer = transfer, order = order, shop = shop,
  product = product, count = count, time = now, coins = -total}
redis.call('ZADD', P .. ':hist:' .. buyer, transfer, cmsgpack.pack(h))
h.kind = 'sale'
h.coins = earned
h.buyer = buyer
redis.call('ZADD', P .. ':hist:' .. shop, transfer, cmsgpack.pack(h))

if cap > 0 then
  redis.call('INCRBY', spentKey, total)
  redis.call('EXPIRE', spentKey, 172800)
end

redis.call('HSET', idem, 'body', body, 'order', order, 'coins', buyer_bal, 'stock', left,
  'transfer', transfer)
redis.call('EXPIRE', idem, tonumber(ARGV[12]))

local roomkey = P .. ':room:' .. shop
local state = redis.call('HMGET', roomkey, 'live', 'session')
local seq = nil
if state[1] == '1' then
  -- The room's one seq counter, shared with bubbles.
  seq = redis.call('HINCRBY', roomkey, 'seq', 1)
end

-- Publish last: the events announce only what is already committed above.
if seq then
  local from = {user = buyer, name = name, avatar = cjson.null}
  if avatar ~= '' then
    from.avatar = avatar
  end
  redis.call('SPUBLISH', P .. ':room:' .. shop, cmsgpack.pack({'event', {ev = 'sale',
    room = shop, session = tonumber(state[2]), seq = seq, from = from,
    product = {id = product, name = pname}, count = count, stock = left, time = now}}))
end
redis.call('SPUBLISH', P .. ':user:' .. shop, cmsgpack.pack({'event', {ev = 'order',
  order = order, shop = shop, buyer = {user = buyer, name = name}, product = product,
  count = count, coins = total, status = 'paid', time = now, earned = earned}, ''}))
redis.call('SPUBLISH', P .. ':user:' .. shop, cmsgpack.pack({'balance', seller_bal, ''}))
redis.call('SPUBLISH', P .. ':user:' .. buyer, cmsgpack.pack({'balance', buyer_bal, ARGV[11]}))

return {order, buyer_bal, left, 0}
