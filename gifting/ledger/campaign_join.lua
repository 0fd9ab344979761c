-- campaign_join: a creator joins a brand campaign; their gifts count from now on.
--
-- KEYS[1]  <P>:bal
-- ARGV[1]  creator user id         ARGV[2]  creator display name
-- ARGV[3]  campaign id             ARGV[4]  open campaigns a creator may have joined
--
-- Records the join time in P:camp:<id>:joined (the first join is kept), the
-- campaign in P:camps:joined:<creator> (score = ends; what gift.lua checks) and
-- in P:camps:member:<creator> (score = join ms; what `campaigns` lists), and the
-- creator's name in P:names (for the reward event). Joining twice is fine.
--
-- Returns {join_ms, already_joined(0|1)}
-- or an error reply "<code> <message>" with code one of (checked in this order)
--   unknown_item  no such campaign
--   closed        the campaign has ended (store time >= ends), is exhausted or closed
--   forbidden     the campaign is restricted to creators this one is not among,
--                 or the creator already has the largest number of open campaigns.
-- Nothing is written before every check has passed.

local P = string.sub(KEYS[1], 1, -5)
local user, name, id = ARGV[1], ARGV[2], ARGV[3]
local limit = tonumber(ARGV[4])

local ck = P .. ':camp:' .. id
local c = redis.call('HMGET', ck, 'status', 'ends', 'restricted')
if not c[1] then
  return redis.error_reply('unknown_item no such campaign: ' .. id)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = tonumber(c[2])
if c[1] ~= 'open' or now >= ends then
  return redis.error_reply('closed campaign ' .. id .. ' is not open')
end

local joined = P .. ':camp:' .. id .. ':joined'
local since = redis.call('HGET', joined, user)
if since then
  return {tonumber(since), 1}
end
if c[3] == '1' and redis.call('SISMEMBER', P .. ':camp:' .. id .. ':allowed', user) == 0 then
  return redis.error_reply('forbidden this campaign is for invited creators only')
end

-- Only open campaigns count toward the limit. The working set holds what the
-- creator joined and has not seen end: drop what ended, was exhausted or closed.
local mine = P .. ':camps:joined:' .. user
local open, stale = 0, {}
for _, other in ipairs(redis.call('ZRANGEBYSCORE', mine, '(' .. now, '+inf')) do
  if redis.call('HGET', P .. ':camp:' .. other, 'status') == 'open' then
    open = open + 1
  else
    stale[#stale + 1] = other
  end
end
if open >= limit then
  return redis.error_reply(string.format(
    'forbidden at most %d open campaigns at a time', limit))
end

-- Every check passed: from here on, write.
redis.call('ZREMRANGEBYSCORE', mine, '-inf', now)
if #stale > 0 then
  redis.call('ZREM', mine, unpack(stale))
end
redis.call('HSET', joined, user, now)
redis.call('ZADD', mine, ends, id)
redis.call('ZADD', P .. ':camps:member:' .. user, now, id)
redis.call('HSET', P .. ':names', user, name)
return {now, 0}
