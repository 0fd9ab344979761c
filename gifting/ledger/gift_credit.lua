-- gift_credit: step 2 of a gift under --partitions N, in the CREATOR's
-- partition: apply an outbox entry (gift_debit.lua's) at most once.
--
-- KEYS[1]  <Pd>:bal
-- ARGV[1]  the outbox entry (msgpack)   ARGV[2] feed stream length kept
-- ARGV[3]  seconds a transfer's mark is kept (<Pd>:done:<transfer>)
--
-- Returns 1 (credited now), 0 (credited before: nothing written) or 2 (the
-- room is not live any more: nothing credited, the transfer is marked
-- "refund" and the caller gives the coins back in the sender's partition
-- with gift_refund.lua). The bubble is published after every write.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local e = cmsgpack.unpack(ARGV[1])
local done = P .. ':done:' .. e.t
local mark = redis.call('GET', done)
if mark == 'credit' then
  return 0
elseif mark then
  return 2
end
local room = e.room
local roomkey = P .. ':room:' .. room
local state = redis.call('HMGET', roomkey, 'live', 'session')
if state[1] ~= '1' then
  redis.call('SET', done, 'refund', 'EX', tonumber(ARGV[3]))
  return 2
end
local session = tonumber(state[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

redis.call('HINCRBY', bal, '~transit', -e.cost)
local creator_bal = redis.call('HINCRBY', bal, room, e.earned)
if e.fee > 0 then
  redis.call('HINCRBY', bal, '~platform', e.fee)
end
local post = string.format('~transit=%d;%s=%d;~platform=%d', -e.cost, room, e.earned, e.fee)
redis.call('XADD', P .. ':journal', '*', 't', e.t, 'kind', 'gift_credit', 'ms', now,
  'post', post, 'room', room, 'session', session, 'gift', e.gift, 'count', e.count,
  'from', e.sender)

local total = redis.call('HINCRBY', roomkey, 'earned', e.earned)
local seq = redis.call('HINCRBY', roomkey, 'seq', 1)
local from = {user = e.sender, name = e.name}
local entry = {room = room, session = session, transfer = e.t, from = from, gift = e.gift,
  count = e.count, coins = e.cost, earned = e.earned, total = total}
local offset = redis.call('XADD', P .. ':feed:' .. room, 'MAXLEN', '~', ARGV[2], '*',
  'e', cmsgpack.pack(entry))
local topkey = P .. ':top:' .. room .. ':' .. session
redis.call('ZINCRBY', topkey, e.cost, e.sender)
redis.call('EXPIRE', topkey, 604800)
redis.call('HSET', P .. ':names', e.sender, e.name)
redis.call('ZADD', P .. ':hist:' .. room, e.t, cmsgpack.pack({kind = 'gift', transfer = e.t,
  time = e.ms, room = room, gift = e.gift, count = e.count, coins = e.earned, from = e.sender}))
redis.call('SET', done, 'credit', 'EX', tonumber(ARGV[3]))

entry.offset = offset
local bfrom = {user = e.sender, name = e.name}
if e.avatar ~= '' then
  bfrom.avatar = e.avatar
end
local bubble = {room = room, session = session, seq = seq, from = bfrom, gift = e.gift,
  count = e.count, coins = e.cost, combo = e.combo, time = e.ms}
redis.call('SPUBLISH', P .. ':room:' .. room, cmsgpack.pack({'gift', bubble, entry}))
redis.call('SPUBLISH', P .. ':user:' .. room, cmsgpack.pack({'balance', creator_bal, ''}))
return 1
