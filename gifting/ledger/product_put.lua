-- product_put: create or replace a product in a user's shop, and journal its stock.
--
-- KEYS[1]  <P>:bal  (only to derive <P>, the hash-tagged prefix of every key here)
-- ARGV[1]  shop (= owner user id)  ARGV[2]  product id
-- ARGV[3]  name                    ARGV[4]  unit price, coins (1-10^9)
-- ARGV[5]  stock (0-10^9)          ARGV[6]  image URL ("" for none)
--
-- The hub has checked every field. Moves no coin, so the journal record has no
-- transfer id and no postings: kind "stock" with shop, product and stock, from
-- which the audit replays each product's stock (purchases take from it, refunds
-- give back). When the product is the one pinned in its owner's live room, the
-- room gets a fresh ``pinned`` event, so viewers see the new price before buying.
--
-- Returns {created(0|1)}.

local P = string.sub(KEYS[1], 1, -5)
local shop, product, name = ARGV[1], ARGV[2], ARGV[3]
local coins, stock, image = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local pkey = P .. ':prod:' .. shop .. ':' .. product
local created = redis.call('HSETNX', pkey, 'created', now)
redis.call('HSET', pkey, 'name', name, 'coins', coins, 'stock', stock, 'image', image)
-- Listing order: the position the product first took (products are never
-- deleted, so ZCARD + 1 only grows; two puts within one ms keep their order).
local listing = P .. ':shop:' .. shop
if created == 1 then
  redis.call('ZADD', listing, 'NX', redis.call('ZCARD', listing) + 1, product)
end
redis.call('XADD', P .. ':journal', '*', 'kind', 'stock', 'ms', now,
  'shop', shop, 'product', product, 'stock', stock)

local roomkey = P .. ':room:' .. shop
local state = redis.call('HMGET', roomkey, 'live', 'session', 'pinned', 'pinsess')
if state[1] == '1' and state[3] == product and state[4] == state[2] then
  local obj = {id = product, name = name, coins = coins, stock = stock, image = cjson.null}
  if image ~= '' then
    obj.image = image
  end
  redis.call('SPUBLISH', P .. ':room:' .. shop,
    cmsgpack.pack({'event', {ev = 'pinned', room = shop, product = obj}}))
end

return {created}
