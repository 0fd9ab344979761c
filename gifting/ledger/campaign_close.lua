-- campaign_close: close a campaign and return what is left in escrow to its brand.
--
-- KEYS[1]  <P>:bal
-- ARGV[1]  campaign id
-- ARGV[2]  the caller: the brand closing it, or "" for the sweeper
-- ARGV[3]  "1" for the sweeper (expire): acts only once store time >= ends,
--          and answers a campaign already closed with {0, 0, 0}, not an error
-- ARGV[4]  connection id of the caller (its balance event is skipped there)
--
-- The rest of "~escrow:<campaign>" moves back to the brand (journal kind
-- "escrow", step "return"; brand history "escrow" with positive coins), the
-- status becomes "closed" and the campaign leaves P:camps:open. A closed
-- campaign is never closed again, so the rest returns exactly once however
-- many hubs' sweepers and brands race for it. An empty escrow (every reward
-- paid) closes with no journal entry.
--
-- Returns {refunded, transfer (0: nothing moved), closed_now(0|1)}
-- or an error reply "<code> <message>" with code one of (checked in this order)
--   unknown_item  no such campaign
--   forbidden     the caller is not the campaign's brand
--   closed        the campaign is already closed.
-- Nothing is written before every check has passed.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local id, caller, expire = ARGV[1], ARGV[2], ARGV[3] == '1'

local ck = P .. ':camp:' .. id
local c = redis.call('HMGET', ck, 'status', 'brand', 'ends')
if not c[1] then
  return redis.error_reply('unknown_item no such campaign: ' .. id)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if expire then
  if c[1] == 'closed' or now < tonumber(c[3]) then
    return {0, 0, 0}
  end
else
  if c[2] ~= caller then
    return redis.error_reply('forbidden only the campaign\'s brand can close it')
  end
  if c[1] == 'closed' then
    return redis.error_reply('closed campaign ' .. id .. ' is already closed')
  end
end

-- Every check passed: from here on, write.
local brand = c[2]
local escrow = '~escrow:' .. id
local rest = tonumber(redis.call('HGET', bal, escrow) or '0')
local transfer = 0
if rest > 0 then
  redis.call('HINCRBY', bal, escrow, -rest)
  local left = redis.call('HINCRBY', bal, brand, rest)
  transfer = redis.call('INCR', P .. ':xfer')
  local post = string.format('%s=%d;%s=%d', escrow, -rest, brand, rest)
  redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'escrow', 'ms', now,
    'post', post, 'campaign', id, 'step', 'return', 'brand', brand)
  redis.call('ZADD', P .. ':hist:' .. brand, transfer, cmsgpack.pack(
    {kind = 'escrow', transfer = transfer, time = now, coins = rest, campaign = id}))
  redis.call('SPUBLISH', P .. ':user:' .. brand, cmsgpack.pack({'balance', left, ARGV[4]}))
end
redis.call('HSET', ck, 'status', 'closed', 'closed_at', now, 'closed_by', transfer,
  'refunded', rest)
redis.call('ZREM', P .. ':camps:open', id)
return {rest, transfer, 1}
