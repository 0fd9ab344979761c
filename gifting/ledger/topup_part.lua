-- topup_part: topup.lua under --partitions N, in the user's partition. The
-- top-up key is remembered in that partition (so per user, not global), and
-- the transfer id is n * N + k like every transfer id under partitions.
--
-- KEYS[1]  <P>:bal
-- ARGV[1]  user   ARGV[2] coins   ARGV[3] top-up key   ARGV[4] largest balance
-- ARGV[5]  N   ARGV[6] this partition's index
-- Returns {balance, duplicate(0|1), transfer}; errors conflict, forbidden.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local user, coins, key = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local body = user .. '|' .. ARGV[2]
local k = P .. ':topup:' .. key
local seen = redis.call('HMGET', k, 'body', 'transfer')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict top-up key already used for a different top-up')
  end
  return {tonumber(redis.call('HGET', bal, user) or '0'), 1, tonumber(seen[2])}
end
local have = tonumber(redis.call('HGET', bal, user) or '0')
if have + coins > tonumber(ARGV[4]) then
  return redis.error_reply('forbidden balance would exceed the largest allowed')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HINCRBY', bal, '~issuer', -coins)
local left = redis.call('HINCRBY', bal, user, coins)
local transfer = redis.call('INCR', P .. ':xfer') * tonumber(ARGV[5]) + tonumber(ARGV[6])
local post = string.format('~issuer=%d;%s=%d', -coins, user, coins)
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'topup', 'ms', now, 'post', post)
redis.call('ZADD', P .. ':hist:' .. user, transfer,
  cmsgpack.pack({kind = 'topup', transfer = transfer, time = now, coins = coins}))
redis.call('HSET', k, 'body', body, 'transfer', transfer)
redis.call('SPUBLISH', P .. ':user:' .. user, cmsgpack.pack({'balance', left, ''}))
return {left, 0, transfer}
