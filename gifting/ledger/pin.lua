-- pin: the creator of a live room pins one of their products in it (or unpins).
--
-- KEYS[1]  <P>:bal  (only to derive <P>, the hash-tagged prefix of every key here)
-- ARGV[1]  room (= the caller, creator and shop owner)
-- ARGV[2]  product id, or "" to unpin
--
-- The pin belongs to the session it was made in (``pinsess``): after end_live
-- and the next go_live nothing is pinned until the creator pins again, without
-- the live script having to know about shops.
--
-- Returns {session} or an error reply "<code> <message>" with code one of
-- not_live, unknown_item (checked in that order). Nothing is written before
-- every check has passed. Publishes ``pinned`` {room, product (object or null)}
-- to the room, without a seq (it is state, not a bubble).

local P = string.sub(KEYS[1], 1, -5)
local room, product = ARGV[1], ARGV[2]
local roomkey = P .. ':room:' .. room

local state = redis.call('HMGET', roomkey, 'live', 'session')
if state[1] ~= '1' then
  return redis.error_reply('not_live room ' .. room .. ' is not live')
end

local obj = cjson.null
if product ~= '' then
  local p = redis.call('HMGET', P .. ':prod:' .. room .. ':' .. product,
    'name', 'coins', 'stock', 'image')
  if not p[1] then
    return redis.error_reply('unknown_item no product ' .. product .. ' in shop ' .. room)
  end
  obj = {id = product, name = p[1], coins = tonumber(p[2]), stock = tonumber(p[3]),
    image = cjson.null}
  if p[4] and p[4] ~= '' then
    obj.image = p[4]
  end
end

-- Every check passed: from here on, write.
if product == '' then
  redis.call('HDEL', roomkey, 'pinned', 'pinsess')
else
  redis.call('HSET', roomkey, 'pinned', product, 'pinsess', state[2])
end
redis.call('SPUBLISH', P .. ':room:' .. room,
  cmsgpack.pack({'event', {ev = 'pinned', room = room, product = obj}}))
return {tonumber(state[2])}
