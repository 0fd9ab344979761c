-- gift: move coins from a viewer to a live creator (and the platform), atomically.
--
-- KEYS[1]  <P>:bal  (the balances hash; <P> is the hash-tagged prefix, e.g. "{g}",
--          from which every other key of this call is derived, so all share one slot)
-- ARGV[1]  sender user id          ARGV[2]  room (= creator user id)
-- ARGV[3]  gift id                 ARGV[4]  count (1-99, checked by the hub)
-- ARGV[5]  idempotency key         ARGV[6]  sender display name
-- ARGV[7]  sender avatar URL ("" for none)
-- ARGV[8]  creator share, percent (0-100)
-- ARGV[9]  "1" when the hub's rate limiter refused this gift, else "0"
-- ARGV[10] connection id of the caller (its balance event is skipped there)
-- ARGV[11] feed stream length kept (approximate MAXLEN)
-- ARGV[12] seconds an idempotency key is remembered
-- ARGV[13] coins the sender may spend per UTC day (0: no cap)
--
-- Returns {transfer, sender_balance_after, combo, duplicate(0|1)}
-- or an error reply "<code> <message>" with code one of
-- unknown_gift, not_live, rate_limited, conflict, insufficient_funds, spend_limit.
-- Nothing is written before every check has passed.
--
-- Brand campaigns (the reward step, after the gift's own writes, never failing):
-- for each campaign in P:camps:joined:<room> that has not ended (store time <
-- ends), is "open" and has not yet rewarded this creator, the creator's progress
-- in this session (P:camp:<id>:prog:<room> {session, value}, reset when the
-- stored session is not this one) grows by the metric: "gifts" by count,
-- "gift_coins" by the coins the sender paid, "gifters" by 1 for a sender new to
-- P:camp:<id>:fans:<room>:<session>. Only gifts after the join reach this step,
-- so progress counts from the later of the session's start and the join. When
-- it reaches the threshold and the escrow holds the reward, the reward moves
-- from "~escrow:<id>" to the creator as its own transfer (journal kind
-- "reward"; creator history "reward"), the creator is marked rewarded, and the
-- campaign becomes "exhausted" when the escrow left is below one reward. Event
-- "reward" goes to the creator's and the brand's user channels and, after the
-- bubble and with the room's next seq, to the room; the creator's balance
-- event carries the balance after the reward. Campaigns found closed or
-- exhausted leave the creator's working set. A room with no joined campaign
-- costs one ZRANGEBYSCORE of a missing key.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local sender, room, gift = ARGV[1], ARGV[2], ARGV[3]
local count = tonumber(ARGV[4])
local key, name, avatar = ARGV[5], ARGV[6], ARGV[7]
local share_pct = tonumber(ARGV[8])

local price = redis.call('HGET', P .. ':catalog', gift)
if not price then
  return redis.error_reply('unknown_gift no such gift: ' .. gift)
end
price = tonumber(price)

local roomkey = P .. ':room:' .. room
local state = redis.call('HMGET', roomkey, 'live', 'session')
if state[1] ~= '1' then
  return redis.error_reply('not_live room ' .. room .. ' is not live')
end
local session = tonumber(state[2])

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
  return {tonumber(seen[2]), tonumber(seen[3]), tonumber(seen[4]), 1}
end

local cost = price * count
local have = tonumber(redis.call('HGET', bal, sender) or '0')
if have < cost then
  return redis.error_reply(string.format('insufficient_funds need %d coins, have %d', cost, have))
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[13] or '0')
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
local creator_bal = redis.call('HINCRBY', bal, room, earned)
if fee > 0 then
  redis.call('HINCRBY', bal, '~platform', fee)
end
local transfer = redis.call('INCR', P .. ':xfer')

local comboKey = P .. ':combo:' .. room .. ':' .. sender
local last = redis.call('HMGET', comboKey, 'gift', 'n')
local combo = 1
if last[1] == gift then
  combo = tonumber(last[2]) + 1
end
redis.call('HSET', comboKey, 'gift', gift, 'n', combo)
redis.call('PEXPIRE', comboKey, 3000)

local post = string.format('%s=%d;%s=%d;~platform=%d', sender, -cost, room, earned, fee)
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'gift', 'ms', now,
  'post', post, 'room', room, 'session', session, 'gift', gift, 'count', count)
redis.call('HSET', P .. ':posts', transfer, 'gift|' .. post)

local total = redis.call('HINCRBY', roomkey, 'earned', earned)
local seq = redis.call('HINCRBY', roomkey, 'seq', 1)

local from = {user = sender, name = name}
local entry = {room = room, session = session, transfer = transfer, from = from, gift = gift, count = count,
  coins = cost, earned = earned, total = total}
local offset = redis.call('XADD', P .. ':feed:' .. room, 'MAXLEN', '~', ARGV[11], '*',
  'e', cmsgpack.pack(entry))

local topkey = P .. ':top:' .. room .. ':' .. session
redis.call('ZINCRBY', topkey, cost, sender)
redis.call('EXPIRE', topkey, 604800)
redis.call('HSET', P .. ':names', sender, name)

local h = {kind = 'gift', transfer = transfer, time = now, room = room, gift = gift,
  count = count}
h.coins = -cost
h.to = room
redis.call('ZADD', P .. ':hist:' .. sender, transfer, cmsgpack.pack(h))
h.coins = earned
h.to = nil
h.from = sender
redis.call('ZADD', P .. ':hist:' .. room, transfer, cmsgpack.pack(h))

if cap > 0 then
  redis.call('INCRBY', spentKey, cost)
  redis.call('EXPIRE', spentKey, 172800)
end

redis.call('HSET', idem, 'body', body, 'transfer', transfer, 'coins', left, 'combo', combo)
redis.call('EXPIRE', idem, tonumber(ARGV[12]))

-- Brand campaigns the creator joined (see the header); most rooms have none.
local rewards = {}
local mine = P .. ':camps:joined:' .. room
local camps = redis.call('ZRANGEBYSCORE', mine, '(' .. now, '+inf')
for _, cid in ipairs(camps) do
  local ck = P .. ':camp:' .. cid
  local c = redis.call('HMGET', ck, 'status', 'metric', 'threshold', 'reward', 'ends',
    'title', 'brand', 'brand_name')
  if c[1] ~= 'open' then
    redis.call('ZREM', mine, cid)
  elseif redis.call('HEXISTS', ck .. ':rewarded', room) == 0 then
    local progkey = ck .. ':prog:' .. room
    local prog = redis.call('HMGET', progkey, 'session', 'value')
    local value = 0
    if tonumber(prog[1]) == session then
      value = tonumber(prog[2])
    end
    if c[2] == 'gifts' then
      value = value + count
    elseif c[2] == 'gift_coins' then
      value = value + cost
    else
      local fans = ck .. ':fans:' .. room .. ':' .. session
      value = value + redis.call('SADD', fans, sender)
      -- Of no use once the campaign ends.
      redis.call('PEXPIREAT', fans, tonumber(c[5]) + 3600000)
    end
    redis.call('HSET', progkey, 'session', session, 'value', value)
    local reward = tonumber(c[4])
    local escrow = '~escrow:' .. cid
    local held = tonumber(redis.call('HGET', bal, escrow) or '0')
    if value >= tonumber(c[3]) and held >= reward then
      redis.call('HINCRBY', bal, escrow, -reward)
      creator_bal = redis.call('HINCRBY', bal, room, reward)
      local rt = redis.call('INCR', P .. ':xfer')
      local rpost = string.format('%s=%d;%s=%d', escrow, -reward, room, reward)
      redis.call('XADD', P .. ':journal', '*', 't', rt, 'kind', 'reward', 'ms', now,
        'post', rpost, 'campaign', cid, 'creator', room, 'session', session, 'gift', transfer)
      redis.call('HSET', ck .. ':rewarded', room, rt)
      if held - reward < reward then
        redis.call('HSET', ck, 'status', 'exhausted')
      end
      redis.call('ZADD', P .. ':hist:' .. room, rt, cmsgpack.pack({kind = 'reward',
        transfer = rt, time = now, coins = reward, campaign = cid, room = room}))
      -- The room's next seq: the bubble's came first, so the reward follows it.
      local ev = {ev = 'reward', campaign = cid, title = c[6],
        brand = {user = c[7], name = c[8]}, coins = reward}
      rewards[#rewards + 1] = {ev, redis.call('HINCRBY', roomkey, 'seq', 1)}
    end
  end
end

-- Publish last: the bubble announces only what is already committed above.
entry.offset = offset
local bfrom = {user = sender, name = name}
if avatar ~= '' then
  bfrom.avatar = avatar
end
local bubble = {room = room, session = session, seq = seq, from = bfrom, gift = gift,
  count = count, coins = cost, combo = combo, time = now}
redis.call('SPUBLISH', P .. ':room:' .. room, cmsgpack.pack({'gift', bubble, entry}))
if #rewards > 0 then
  local creator = {user = room, name = redis.call('HGET', P .. ':names', room) or room}
  for _, rw in ipairs(rewards) do
    local ev = rw[1]
    ev.creator = creator
    local packed = cmsgpack.pack({'event', ev, ''})
    redis.call('SPUBLISH', P .. ':user:' .. room, packed)
    if ev.brand.user ~= room then
      redis.call('SPUBLISH', P .. ':user:' .. ev.brand.user, packed)
    end
    ev.room, ev.session, ev.seq, ev.time = room, session, rw[2], now
    redis.call('SPUBLISH', P .. ':room:' .. room, cmsgpack.pack({'event', ev}))
  end
end
redis.call('SPUBLISH', P .. ':user:' .. room, cmsgpack.pack({'balance', creator_bal, ''}))
redis.call('SPUBLISH', P .. ':user:' .. sender, cmsgpack.pack({'balance', left, ARGV[10]}))

return {transfer, left, combo, 0}
