-- live: start or end a creator's live session.
--
-- KEYS[1]  <P>:bal
-- ARGV[1]  room (= creator user id)
-- ARGV[2]  "1" to go live, "0" to end
-- ARGV[3]  title (go live only)
--
-- Going live always starts a new session (an open one ends first). Ending
-- one unpins the room's product (event ``pinned`` with null, after ``live``).
-- Returns {session, earned_this_session} or, when ending a room that is
-- not live, the error reply "not_live ...".

local P = string.sub(KEYS[1], 1, -5)
local room = ARGV[1]
local roomkey = P .. ':room:' .. room
local chan = P .. ':room:' .. room
local state = redis.call('HMGET', roomkey, 'live', 'session', 'earned')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if ARGV[2] == '1' then
  local session = redis.call('HINCRBY', roomkey, 'session', 1)
  redis.call('HSET', roomkey, 'live', '1', 'earned', 0, 'title', ARGV[3], 'started', now)
  redis.call('SPUBLISH', chan, cmsgpack.pack({'live', room, true, session, ARGV[3]}))
  return {session, 0}
end

if state[1] ~= '1' then
  return redis.error_reply('not_live room ' .. room .. ' is not live')
end
local session = tonumber(state[2])
redis.call('HSET', roomkey, 'live', '0', 'ended', now)
local title = redis.call('HGET', roomkey, 'title') or ''
redis.call('SPUBLISH', chan, cmsgpack.pack({'live', room, false, session, title}))
-- A pin lasts one live session: tell the room it is gone.
if redis.call('HDEL', roomkey, 'pinned', 'pinsess') > 0 then
  redis.call('SPUBLISH', chan, cmsgpack.pack({'event', {ev = 'pinned', room = room, product = cjson.null}}))
end
return {session, tonumber(state[3] or '0')}
