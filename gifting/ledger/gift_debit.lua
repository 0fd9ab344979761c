-- gift_debit: step 1 of a gift under --partitions N (see partitioned.py):
-- every check that concerns the sender, then debit the sender into this
-- partition's in-flight account "~transit" and write the outbox entry, all in
-- the SENDER's partition, atomically.
--
-- KEYS[1]  <Ps>:bal (the sender's partition; every other key derives from it)
-- ARGV[1]  sender   ARGV[2] room (= creator)   ARGV[3] gift   ARGV[4] count
-- ARGV[5]  idempotency key   ARGV[6] sender name   ARGV[7] avatar ("" for none)
-- ARGV[8]  creator share %   ARGV[9] "1" when rate limited
-- ARGV[10] caller's connection id   ARGV[11] idempotency ttl (s)
-- ARGV[12] daily cap (0: none)   ARGV[13] "1" when the hub saw the room live
-- ARGV[14] N (partitions)   ARGV[15] this partition's index
-- ARGV[16] the creator's partition index
--
-- Returns {transfer, sender_balance_after, combo, duplicate(0|1), entry|false}
-- where entry is the msgpack outbox entry still to credit (false on a
-- duplicate whose credit is done). Errors as gift.lua, in its order:
-- unknown_gift, not_live, rate_limited, conflict, insufficient_funds, spend_limit.
-- A transfer id is n * N + k (n: this partition's counter): unique over all
-- partitions, and its partition is transfer % N.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local sender, room, gift = ARGV[1], ARGV[2], ARGV[3]
local count = tonumber(ARGV[4])
local key, name, avatar = ARGV[5], ARGV[6], ARGV[7]
local share_pct = tonumber(ARGV[8])
local N, k = tonumber(ARGV[14]), tonumber(ARGV[15])

local price = redis.call('HGET', P .. ':catalog', gift)
if not price then
  return redis.error_reply('unknown_gift no such gift: ' .. gift)
end
price = tonumber(price)
if ARGV[13] ~= '1' then
  return redis.error_reply('not_live room ' .. room .. ' is not live')
end
if ARGV[9] == '1' then
  return redis.error_reply('rate_limited too many gifts, slow down')
end

local body = room .. '|' .. gift .. '|' .. ARGV[4]
local idem = P .. ':idem:' .. sender .. ':' .. key
local seen = redis.call('HMGET', idem, 'body', 'transfer', 'coins', 'combo')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict key already used for a different gift')
  end
  local pending = redis.call('HGET', P .. ':out', seen[2]) or false
  return {tonumber(seen[2]), tonumber(seen[3]), tonumber(seen[4]), 1, pending}
end

local cost = price * count
local have = tonumber(redis.call('HGET', bal, sender) or '0')
if have < cost then
  return redis.error_reply(string.format('insufficient_funds need %d coins, have %d', cost, have))
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[12] or '0')
local spentKey = P .. ':spent:' .. sender .. ':' .. math.floor(tonumber(t[1]) / 86400)
if cap > 0 then
  local spent = tonumber(redis.call('GET', spentKey) or '0')
  if spent + cost > cap then
    return redis.error_reply(string.format(
      'spend_limit daily limit of %d coins: %d spent today, this gift costs %d', cap, spent, cost))
  end
end

-- Every check passed: from here on, write.
local earned = math.floor(cost * share_pct / 100)
local fee = cost - earned
local left = redis.call('HINCRBY', bal, sender, -cost)
redis.call('HINCRBY', bal, '~transit', cost)
local transfer = redis.call('INCR', P .. ':xfer') * N + k

local comboKey = P .. ':combo:' .. room .. ':' .. sender
local last = redis.call('HMGET', comboKey, 'gift', 'n')
local combo = 1
if last[1] == gift then
  combo = tonumber(last[2]) + 1
end
redis.call('HSET', comboKey, 'gift', gift, 'n', combo)
redis.call('PEXPIRE', comboKey, 3000)

local post = string.format('%s=%d;~transit=%d', sender, -cost, cost)
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'gift_debit', 'ms', now,
  'post', post, 'room', room, 'gift', gift, 'count', count, 'to', ARGV[16])

redis.call('ZADD', P .. ':hist:' .. sender, transfer, cmsgpack.pack({kind = 'gift',
  transfer = transfer, time = now, room = room, gift = gift, count = count, coins = -cost,
  to = room}))

if cap > 0 then
  redis.call('INCRBY', spentKey, cost)
  redis.call('EXPIRE', spentKey, 172800)
else
  spentKey = ''
end

redis.call('HSET', idem, 'body', body, 'transfer', transfer, 'coins', left, 'combo', combo)
redis.call('EXPIRE', idem, tonumber(ARGV[11]))

local entry = cmsgpack.pack({t = transfer, dest = tonumber(ARGV[16]), room = room,
  sender = sender, name = name, avatar = avatar, gift = gift, count = count, cost = cost,
  earned = earned, fee = fee, combo = combo, ms = now, idem = idem, spent = spentKey})
redis.call('HSET', P .. ':out', transfer, entry)

redis.call('SPUBLISH', P .. ':user:' .. sender, cmsgpack.pack({'balance', left, ARGV[10]}))
return {transfer, left, combo, 0, entry}
