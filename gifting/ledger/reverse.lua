-- reverse: undo a transfer by a new, compensating one (the journal is never edited).
--
-- KEYS[1]  <P>:bal
-- ARGV[1]  transfer id to reverse
-- ARGV[2]  reversal key (remembered forever, global)
-- ARGV[3]  "1" to allow driving an account negative, else "0"
-- ARGV[4]  reason (free text, kept in the journal)
--
-- Returns {reversal transfer, reversed transfer, duplicate(0|1)}
-- or an error reply: conflict (key used for another reversal, or the transfer
-- was already reversed), unknown_item (no such transfer), forbidden (a reversal
-- or a shop refund cannot itself be reversed), insufficient_funds (an account would go negative
-- and ARGV[3] is not "1"). Nothing is written before every check has passed.

local bal = KEYS[1]
local P = string.sub(bal, 1, -5)
local of, key, force, reason = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local body = of .. '|' .. ARGV[3]
local k = P .. ':reverse:' .. key
local seen = redis.call('HMGET', k, 'body', 'transfer')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict reversal key already used for a different reversal')
  end
  return {tonumber(seen[2]), tonumber(of), 1}
end

local posted = redis.call('HGET', P .. ':posts', of)
if not posted then
  return redis.error_reply('unknown_item no transfer ' .. of .. ' in the journal index')
end
local kind, post = string.match(posted, '^([^|]*)|(.*)$')
if kind == 'reverse' then
  return redis.error_reply('forbidden a reversal cannot be reversed; top up instead')
end
if kind == 'refund' then
  -- It would charge the buyer again while the order stays refunded.
  return redis.error_reply('forbidden a refund cannot be reversed; the order stays refunded')
end
local by = redis.call('HGET', P .. ':reversed', of)
if by then
  return redis.error_reply('conflict transfer ' .. of .. ' was already reversed by ' .. by)
end

local undo = {}
for acct, delta in string.gmatch(post, '([^=;]+)=(-?%d+)') do
  local d = -tonumber(delta)
  if d < 0 and acct ~= '~issuer' and not force then
    local have = tonumber(redis.call('HGET', bal, acct) or '0')
    if have + d < 0 then
      return redis.error_reply(string.format(
        'insufficient_funds reversing would drive %s negative (has %d, needs %d)', acct, have, -d))
    end
  end
  undo[#undo + 1] = {acct, d}
end

-- Every check passed: from here on, write.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local transfer = redis.call('INCR', P .. ':xfer')
local parts = {}
for _, u in ipairs(undo) do
  local left = redis.call('HINCRBY', bal, u[1], u[2])
  parts[#parts + 1] = string.format('%s=%d', u[1], u[2])
  if string.sub(u[1], 1, 1) ~= '~' then
    redis.call('ZADD', P .. ':hist:' .. u[1], transfer, cmsgpack.pack(
      {kind = 'reversal', transfer = transfer, of = tonumber(of), time = now, coins = u[2]}))
    redis.call('SPUBLISH', P .. ':user:' .. u[1], cmsgpack.pack({'balance', left, ''}))
  end
end
local newpost = table.concat(parts, ';')
redis.call('XADD', P .. ':journal', '*', 't', transfer, 'kind', 'reverse', 'ms', now,
  'post', newpost, 'of', of, 'forced', force and 1 or 0, 'reason', reason)
redis.call('HSET', P .. ':posts', transfer, 'reverse|' .. newpost)
redis.call('HSET', P .. ':reversed', of, transfer)
redis.call('HSET', k, 'body', body, 'transfer', transfer)
return {transfer, tonumber(of), 0}
