-- campaign_create: a brand opens a campaign; its whole budget moves into escrow.
--
-- KEYS[1]  <P>:bal
-- ARGV[1]  brand user id           ARGV[2]  brand display name
-- ARGV[3]  idempotency key         ARGV[4]  request body (canonical, built by the
--          caller from every field; stored as "campaign:<body>", the prefix
--          keeping it apart from other moves' bodies under the same key)
-- ARGV[5]  campaign id             ARGV[6]  title
-- ARGV[7]  budget (1..10^12)       ARGV[8]  reward per creator (1..budget)
-- ARGV[9]  metric (gifts|gift_coins|gifters)
-- ARGV[10] threshold (1..10^9)     ARGV[11] ends (ms since epoch)
-- ARGV[12] longest a campaign may run, ms from now
-- ARGV[13] seconds an idempotency key is remembered
-- ARGV[14] connection id of the caller (its balance event is skipped there)
-- ARGV[15] "1" when only the creators listed next may join, else "0"
-- ARGV[16..] the creators allowed to join (when ARGV[15] is "1")
--
-- The budget moves from the brand to the account "~escrow:<campaign>" (journal
-- kind "escrow", step "hold"; brand history "escrow" with negative coins), so
-- every reward promised is paid. The key is remembered only when coins moved.
--
-- Returns {transfer, brand_balance_after, duplicate(0|1)}
-- or an error reply "<code> <message>" with code one of
--   conflict            the key was used for another move, or the campaign id
--                       exists with another body or brand
--   bad_request         ends is not in the future, or too far in it (store time)
--   insufficient_funds  the brand's balance is below the budget.
-- A replay (same key and body, or same campaign id, brand and body) moves
-- nothing and answers duplicate 1. Nothing is written before every check has passed.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local brand, brand_name, key = ARGV[1], ARGV[2], ARGV[3]
local body = 'campaign:' .. ARGV[4]
local id, title = ARGV[5], ARGV[6]
local budget, reward = tonumber(ARGV[7]), tonumber(ARGV[8])
local metric, threshold, ends = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])

local idem = P .. ':idem:' .. brand .. ':' .. key
local seen = redis.call('HMGET', idem, 'body', 'transfer', 'coins')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict key already used for a different move')
  end
  return {tonumber(seen[2]), tonumber(seen[3]), 1}
end

local ck = P .. ':camp:' .. id
local exists = redis.call('HMGET', ck, 'brand', 'body', 'transfer')
if exists[1] then
  if exists[1] ~= brand or exists[2] ~= body then
    return redis.error_reply('conflict campaign ' .. id .. ' already exists')
  end
  -- The same campaign asked for again under a new key: it is already held.
  return {tonumber(exists[3]), tonumber(redis.call('HGET', bal, brand) or '0'), 1}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ends <= now then
  return redis.error_reply('bad_request ends must be in the future')
end
if ends > now + tonumber(ARGV[12]) then
  return redis.error_reply('bad_request ends is too far in the future')
end

local have = tonumber(redis.call('HGET', bal, brand) or '0')
if have < budget then
  return redis.error_reply(string.format('insufficient_funds need %d coins, have %d', budget, have))
end

-- Every check passed: from here on, write.
local escrow = '~escrow:' .. id
local left = redis.call('HINCRBY', bal, brand, -budget)
redis.call('HINCRBY', bal, escrow, budget)
local transfer = redis.call('INCR', P .. ':xfer')
local post = string.format('%s=%d;%s=%d', brand, -budget, escrow, budget)
-- Not indexed in P:posts: escrow moves are not reversible (a reversal would
-- refill a closed campaign's escrow); campaign_close returns the rest instead.
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'escrow', 'ms', now,
  'post', post, 'campaign', id, 'step', 'hold', 'brand', brand)

local restricted = ARGV[15] == '1' and '1' or '0'
redis.call('HSET', ck, 'brand', brand, 'brand_name', brand_name, 'title', title,
  'budget', budget, 'reward', reward, 'metric', metric, 'threshold', threshold,
  'ends', ends, 'status', 'open', 'restricted', restricted, 'created', now,
  'transfer', transfer, 'body', body)
if restricted == '1' then
  local allowed = P .. ':camp:' .. id .. ':allowed'
  -- SADD in slices: unpack of a long list can overflow the Lua stack.
  for i = 16, #ARGV, 500 do
    redis.call('SADD', allowed, unpack(ARGV, i, math.min(i + 499, #ARGV)))
  end
end
redis.call('ZADD', P .. ':camps:brand:' .. brand, now, id)
redis.call('ZADD', P .. ':camps:open', ends, id)
redis.call('ZADD', P .. ':hist:' .. brand, transfer, cmsgpack.pack(
  {kind = 'escrow', transfer = transfer, time = now, coins = -budget, campaign = id}))

redis.call('HSET', idem, 'body', body, 'transfer', transfer, 'coins', left)
redis.call('EXPIRE', idem, tonumber(ARGV[13]))

redis.call('SPUBLISH', P .. ':user:' .. brand, cmsgpack.pack({'balance', left, ARGV[14]}))
return {transfer, left, 0}
