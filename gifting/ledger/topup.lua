-- topup: issue coins to a user, drawn from the issuing account (sum stays 0).
--
-- KEYS[1]  <P>:bal
-- ARGV[1]  user id     ARGV[2]  coins (1..10^12, checked by the caller)
-- ARGV[3]  top-up key (remembered forever, global)
-- ARGV[4]  largest balance a user may hold
--
-- Returns {balance, duplicate(0|1), transfer}
-- or an error reply: conflict (key used for another user or amount),
-- forbidden (the balance would exceed the cap).

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
local transfer = redis.call('INCR', P .. ':xfer')
local post = string.format('~issuer=%d;%s=%d', -coins, user, coins)
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'topup', 'ms', now, 'post', post)
redis.call('HSET', P .. ':posts', transfer, 'topup|' .. post)
redis.call('ZADD', P .. ':hist:' .. user, transfer,
  cmsgpack.pack({kind = 'topup', transfer = transfer, time = now, coins = coins}))
redis.call('HSET', k, 'body', body, 'transfer', transfer)
redis.call('SPUBLISH', P .. ':user:' .. user, cmsgpack.pack({'balance', left, ''}))
return {left, 0, transfer}
