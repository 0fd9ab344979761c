/* gifting demo pages: shared client code and the three page controllers.
 *
 * Plain JavaScript, no dependencies, no build step. Each HTML page loads this
 * file and names itself with <body data-page="index|viewer|creator|brand">.
 * Everything a user controls (names, titles, room ids) goes into the page
 * through textContent, never through innerHTML.
 */
(function () {
  'use strict';

  const SUBPROTOCOL = 'gifting.v1.json';
  const REQUEST_TIMEOUT_MS = 10000;
  const MAX_BACKOFF_MS = 10000;
  const MAX_ID = 2147483647; // ids are 1 <= id < 2^31
  const MAX_BUBBLES = 8; // older ones scroll out of the stage's fading top
  const BUBBLE_MS = 3000; // on screen; each combo step restarts it
  const BUBBLE_OUT_MS = 600; // the float-up-and-fade exit
  // Gifts with their own picture (gift-<id>.svg); others get the gift box.
  const GIFT_ICONS = new Set(['rose', 'heart', 'star', 'cake', 'rocket', 'castle']);
  const MAX_FEED_ROWS = 300;
  const FEED_PAGE = 500;
  const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const RETRYABLE = new Set(['timeout', 'unavailable', 'disconnected']);

  // ------------------------------------------------------------------ helpers

  const $ = (sel, root) => (root || document).querySelector(sel);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
  const obj = (v) => (isObj(v) ? v : {});
  const arr = (v) => (Array.isArray(v) ? v : []);
  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
  const str = (v) => (typeof v === 'string' ? v : typeof v === 'number' ? String(v) : '');
  const fmt = (v) => (num(v) === null ? '—' : num(v).toLocaleString());
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function setText(sel, value) {
    const e = $(sel);
    if (e) e.textContent = value;
  }

  function gErr(code, message) {
    return { code: code, message: message || code };
  }

  function errCode(e) {
    return isObj(e) && typeof e.code === 'string' ? e.code : 'internal';
  }

  function errText(e) {
    if (!isObj(e) && !(e instanceof Error)) return String(e);
    const code = str(e.code);
    const msg = str(e.message);
    if (code && msg && msg !== code) return msg + ' (' + code + ')';
    return msg || code || 'error';
  }

  // What a viewer should read for each error code; the server's message follows.
  const FRIENDLY = {
    insufficient_funds: 'Not enough coins',
    not_live: 'The creator is not live',
    not_in_room: 'Join the room first',
    self_gift: 'You cannot send gifts to your own room',
    unknown_gift: 'That gift is not in the catalog',
    invalid_count: 'A gift count is 1 to 99',
    rate_limited: 'Slow down: too many gifts at once',
    unavailable: 'The server is busy: try again',
    forbidden: 'Not allowed',
    unauthenticated: 'Not signed in',
    conflict: 'That gift key was already used for another gift',
    unknown_item: 'No such item',
    sold_out: 'Sold out',
    price_changed: 'The price has changed',
    closed: 'That campaign is closed',
  };

  /**
   * "Not enough coins: need 500 coins, have 12", or errText for other codes.
   * `words` overrides FRIENDLY for one action (a refund's `conflict` is not a gift's).
   */
  function friendlyError(e, words) {
    const code = isObj(e) ? str(e.code) : '';
    const own = obj(words);
    const table = Object.prototype.hasOwnProperty.call(own, code) ? own : FRIENDLY;
    const head = Object.prototype.hasOwnProperty.call(table, code) ? table[code] : '';
    if (!head) return errText(e);
    const msg = str(e.message);
    return msg && msg !== code ? head + ': ' + msg : head;
  }

  function safeCall(fn, arg) {
    try {
      fn(arg);
    } catch (e) {
      console.error('gifting: handler failed', e);
    }
  }

  /** A fresh idempotency key: 32 hex characters (works on plain http too). */
  function newKey() {
    const bytes = new Uint8Array(16);
    if (window.crypto && crypto.getRandomValues) crypto.getRandomValues(bytes);
    else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  /** The claims of a JWT, without checking its signature (the server does). */
  function decodeJwt(token) {
    try {
      let b64 = String(token).split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      while (b64.length % 4) b64 += '=';
      const bin = atob(b64);
      const bytes = Uint8Array.from(bin, (ch) => ch.charCodeAt(0));
      return obj(JSON.parse(new TextDecoder().decode(bytes)));
    } catch (_) {
      return {};
    }
  }

  function validRoom(v) {
    return typeof v === 'string' && ROOM_RE.test(v) ? v : null;
  }

  // ------------------------------------------------------------ toast, status

  function toast(message, kind) {
    let box = $('#toasts');
    if (!box) {
      box = el('div', 'toasts');
      box.id = 'toasts';
      box.setAttribute('role', 'status');
      box.setAttribute('aria-live', 'polite');
      document.body.append(box);
    }
    const t = el('div', 'toast ' + (kind || 'error'));
    const icon = kind === 'info' ? 'i' : kind === 'reward' ? '★' : '!';
    t.append(el('span', 'toast-icon', icon), el('span', 'toast-text', message));
    box.append(t);
    while (box.children.length > 4) box.firstElementChild.remove();
    const ms = kind === 'info' ? 3000 : 5000; // errors and rewards stay longer
    setTimeout(() => t.classList.add('out'), ms);
    setTimeout(() => t.remove(), ms + 500);
  }

  function setStatus(kind, text) {
    const s = $('#status');
    if (!s) return;
    s.className = 'status ' + kind;
    s.textContent = text;
  }

  /** The balance, flashing when it went down (a gift) or up (a top-up). */
  function setBalance(v) {
    const b = $('#balance');
    if (!b || num(v) === null) return;
    const before = num(Number(b.dataset.coins));
    b.dataset.coins = String(v);
    b.textContent = fmt(v);
    if (before === null || before === v) return;
    b.className = '';
    void b.offsetWidth; // restart the flash
    b.className = v < before ? 'down' : 'up';
  }

  // ------------------------------------------------------------------ avatars

  const failedAvatars = new Set();

  function colorFor(seed) {
    let h = 0;
    for (let i = 0; i < seed.length; i++) h = (h * 31 + seed.charCodeAt(i)) >>> 0;
    return 'hsl(' + (h % 360) + ', 55%, 42%)';
  }

  function displayName(u) {
    const o = obj(u);
    return str(o.name).trim() || str(o.user) || 'someone';
  }

  /** A gift's picture: a span styled by its catalog id (CSS picks the image). */
  function giftIcon(id, size) {
    const i = el('span', 'gift-icon');
    const gid = str(id);
    i.dataset.gift = GIFT_ICONS.has(gid) ? gid : 'box';
    if (size) i.style.width = i.style.height = size + 'px';
    i.setAttribute('aria-hidden', 'true');
    return i;
  }

  /**
   * The avatar URL if it is safe to load, else null. A token's avatar is user
   * controlled: only an absolute https: URL or a data:image/… URL is loaded;
   * javascript:, http:, relative and any other URL is not, and the avatar
   * shows the name's initial instead.
   */
  function safeImageUrl(v) {
    if (typeof v !== 'string' || !v || v.length > 2048) return null;
    if (/^data:/i.test(v)) return /^data:image\/[a-z0-9.+-]+[;,]/i.test(v) ? v : null;
    let u;
    try {
      u = new URL(v); // no base: a relative URL throws
    } catch (_) {
      return null;
    }
    return u.protocol === 'https:' && u.hostname ? u.href : null;
  }

  /** A round avatar: the picture when it loads, else a coloured initial. */
  function avatar(user, size) {
    const u = obj(user);
    const name = displayName(u);
    const wrap = el('span', 'avatar');
    wrap.style.width = wrap.style.height = size + 'px';
    wrap.style.fontSize = Math.round(size * 0.46) + 'px';
    wrap.style.background = colorFor(str(u.user) || name);
    wrap.textContent = (Array.from(name)[0] || '?').toUpperCase();
    wrap.setAttribute('aria-hidden', 'true');
    const src = safeImageUrl(u.avatar);
    if (src && !failedAvatars.has(src)) {
      const img = new Image();
      img.alt = '';
      img.referrerPolicy = 'no-referrer';
      img.onload = () => {
        wrap.textContent = '';
        wrap.append(img);
      };
      img.onerror = () => failedAvatars.add(src);
      img.src = src;
    }
    return wrap;
  }

  // ------------------------------------------------------------------- client

  /**
   * One WebSocket connection to the hub, JSON subprotocol, token in the URL.
   * request() answers by id (10 s timeout); events are dispatched by `ev`,
   * `batch` events unwrapped; on close it reconnects with exponential backoff
   * and calls onOpen again, where the page re-joins its room.
   */
  class GiftClient {
    constructor(token) {
      this.token = token;
      this.ws = null;
      this.gen = 0;
      this.nextId = 1;
      this.pending = new Map();
      this.handlers = new Map();
      this.attempt = 0;
      this.timer = null;
      this.openedAt = 0;
      this.stopped = false;
      this.ready = false;
      this.readyWaiters = [];
      this.onOpen = null;
      this.retryAt = 0;
      this.retryWhy = '';
      this.ticker = null;
      window.addEventListener('online', () => {
        if (!this.ws && !this.stopped) this.connect();
      });
    }

    /** While waiting to reconnect: connect now instead (the status pill's click). */
    retryNow() {
      if (!this.ws && !this.stopped && this.timer !== null) this.connect();
    }

    on(ev, fn) {
      if (!this.handlers.has(ev)) this.handlers.set(ev, []);
      this.handlers.get(ev).push(fn);
    }

    isOpen() {
      return !!this.ws && this.ws.readyState === WebSocket.OPEN;
    }

    connect() {
      if (this.stopped) return;
      clearTimeout(this.timer);
      this.timer = null;
      clearInterval(this.ticker);
      this.ticker = null;
      const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host +
        '/ws?token=' + encodeURIComponent(this.token);
      const gen = ++this.gen;
      this.openedAt = 0;
      setStatus('connecting', 'Connecting…');
      let ws;
      try {
        ws = new WebSocket(url, SUBPROTOCOL);
      } catch (e) {
        setStatus('bad', 'Cannot connect: ' + errText(e));
        this.scheduleReconnect();
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        if (gen !== this.gen) return;
        this.openedAt = Date.now();
        if (ws.protocol && ws.protocol !== SUBPROTOCOL) {
          console.warn('gifting: server chose subprotocol', ws.protocol);
        }
        setStatus('ok', 'Connected');
        if (this.onOpen) safeCall(this.onOpen, gen);
      };
      ws.onmessage = (m) => {
        if (gen === this.gen) this.handleFrame(m.data);
      };
      ws.onclose = (c) => {
        if (gen === this.gen) this.handleClose(c);
      };
      ws.onerror = () => {}; // a close event always follows
    }

    handleClose(c) {
      this.ws = null;
      this.setReady(false);
      const pending = Array.from(this.pending.values());
      this.pending.clear();
      for (const p of pending) {
        clearTimeout(p.timer);
        p.reject(gErr('disconnected', 'connection lost'));
      }
      if (this.openedAt && Date.now() - this.openedAt > 10000) this.attempt = 0;
      const code = c && c.code;
      if (code === 4001) {
        this.stopped = true;
        setStatus('bad', 'Token rejected (4001): mint a fresh one with `gifting token`');
        return;
      }
      const why = code ? ' (' + code + (c.reason ? ' ' + c.reason : '') + ')' : '';
      this.scheduleReconnect('Disconnected' + why);
    }

    /** Exponential backoff with jitter (0.5 s doubling to 10 s), counted down in the status. */
    scheduleReconnect(prefix) {
      const base = Math.min(MAX_BACKOFF_MS, 500 * Math.pow(2, this.attempt));
      this.attempt = Math.min(this.attempt + 1, 20);
      const delay = Math.round(base * (0.75 + Math.random() * 0.25));
      this.retryAt = Date.now() + delay;
      this.retryWhy = prefix || 'Disconnected';
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.connect(), delay);
      clearInterval(this.ticker);
      this.ticker = setInterval(() => this.showCountdown(), 250);
      this.showCountdown();
    }

    showCountdown() {
      const left = Math.max(0, Math.ceil((this.retryAt - Date.now()) / 1000));
      setStatus('bad', this.retryWhy + ': reconnecting in ' + Math.max(1, left) + ' s');
    }

    handleFrame(data) {
      if (typeof data !== 'string') return; // JSON subprotocol: text frames only
      let msg;
      try {
        msg = JSON.parse(data);
      } catch (_) {
        return;
      }
      if (!isObj(msg)) return;
      if (typeof msg.ev === 'string') {
        this.dispatch(msg, 0);
        return;
      }
      if (typeof msg.id !== 'number') return;
      const p = this.pending.get(msg.id);
      if (!p) return; // late answer to a request that timed out
      this.pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.error !== undefined) {
        const e = obj(msg.error);
        p.reject(gErr(str(e.code) || 'internal', str(e.message)));
      } else {
        p.resolve(obj(msg.ok));
      }
    }

    dispatch(ev, depth) {
      if (ev.ev === 'batch') {
        if (depth > 3) return;
        for (const inner of arr(ev.events)) {
          if (isObj(inner) && typeof inner.ev === 'string') this.dispatch(inner, depth + 1);
        }
        return;
      }
      for (const fn of this.handlers.get(ev.ev) || []) safeCall(fn, ev);
    }

    /** Send a command; resolves with `ok`, rejects with {code, message}. */
    request(op, args) {
      return new Promise((resolve, reject) => {
        const ws = this.ws;
        if (!ws || ws.readyState !== WebSocket.OPEN) {
          reject(gErr('disconnected', 'not connected'));
          return;
        }
        let id = this.nextId;
        while (this.pending.has(id)) id = id >= MAX_ID ? 1 : id + 1;
        this.nextId = id >= MAX_ID ? 1 : id + 1;
        const timer = setTimeout(() => {
          this.pending.delete(id);
          reject(gErr('timeout', op + ': no answer in 10 s'));
        }, REQUEST_TIMEOUT_MS);
        this.pending.set(id, { resolve: resolve, reject: reject, timer: timer });
        try {
          ws.send(JSON.stringify(Object.assign({}, args || {}, { op: op, id: id })));
        } catch (e) {
          clearTimeout(timer);
          this.pending.delete(id);
          reject(gErr('disconnected', errText(e)));
        }
      });
    }

    /** The page marks the connection ready once it has (re)joined its room. */
    setReady(v) {
      this.ready = v;
      if (!v) return;
      const waiters = this.readyWaiters;
      this.readyWaiters = [];
      for (const w of waiters) w();
    }

    whenReady(ms) {
      if (this.ready) return Promise.resolve();
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(gErr('disconnected', 'not connected')), ms);
        this.readyWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  // ----------------------------------------------- pieces shared by the pages

  /** Connects with the page's ?token=, or explains how to get one. */
  function startPage() {
    const params = new URLSearchParams(location.search);
    const token = params.get('token') || '';
    const me = decodeJwt(token);
    const meBox = $('#me');
    if (meBox && token) {
      meBox.textContent = '';
      meBox.append(avatar({ user: me.sub, name: me.name, avatar: me.avatar }, 26),
        el('span', 'me-name', displayName({ user: me.sub, name: me.name })));
    }
    if (!token) {
      setStatus('bad', 'No token');
      const note = $('#no-token');
      if (note) note.hidden = false;
      return null;
    }
    const client = new GiftClient(token);
    client.on('bye', (ev) => {
      const reason = str(ev.reason) || str(ev.code) || 'closing';
      setStatus('bad', 'Server closing: ' + reason);
      toast('Server closing the connection: ' + reason, 'info');
    });
    client.on('error', (ev) => toast('Server: ' + errText(ev)));
    const status = $('#status');
    if (status) {
      status.title = 'Connection (click to reconnect now while disconnected)';
      status.addEventListener('click', () => client.retryNow());
    }
    return { params: params, token: token, me: me, client: client };
  }

  function makeCatalog() {
    const gifts = new Map();
    return {
      gifts: gifts,
      set(list) {
        gifts.clear();
        for (const g of arr(list)) {
          if (isObj(g) && (typeof g.id === 'string' || typeof g.id === 'number')) gifts.set(String(g.id), g);
        }
      },
      name(id) {
        const g = gifts.get(String(id));
        return g ? str(g.name) || str(g.id) : str(id) || 'gift';
      },
    };
  }

  function renderTop(list) {
    const ol = $('#top');
    if (!ol) return;
    ol.textContent = '';
    const entries = arr(list).filter(isObj).slice(0, 10);
    if (!entries.length) {
      ol.append(el('li', 'empty', 'No gifts yet'));
      return;
    }
    entries.forEach((t, i) => {
      // The first three get gold, silver and bronze.
      const li = el('li', i < 3 ? 'podium rank-' + (i + 1) : '');
      li.append(avatar(t, 28), el('span', 'top-name', displayName(t)), el('span', 'coins', fmt(t.coins)));
      ol.append(li);
    });
  }

  function renderLive(live, title) {
    const badge = $('#live-badge');
    if (badge) {
      badge.className = 'badge ' + (live ? 'on' : 'off');
      badge.textContent = live ? 'LIVE' : 'offline';
    }
    const stage = $('#stage');
    if (stage) {
      stage.classList.remove(live ? 'is-off' : 'is-live');
      stage.classList.add(live ? 'is-live' : 'is-off');
    }
    if (typeof title === 'string') setText('#room-subtitle', title);
  }

  // Bubbles on screen by room, sender and gift: a combo updates its bubble.
  const onStage = new Map();

  function comboText(elm, combo, pop) {
    elm.textContent = 'x' + combo;
    const tier = combo >= 30 ? ' huge' : combo >= 10 ? ' big' : '';
    elm.className = 'bubble-combo' + tier;
    if (!pop) return;
    void elm.offsetWidth; // restart the pop
    elm.className = 'bubble-combo' + tier + ' pop';
  }

  /** After BUBBLE_MS the bubble floats up and fades, then leaves the page. */
  function bubbleTimer(entry) {
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      entry.leaving = true;
      entry.el.classList.add('leaving');
      entry.timer = setTimeout(() => {
        entry.el.remove();
        if (onStage.get(entry.key) === entry) onStage.delete(entry.key);
      }, BUBBLE_OUT_MS);
    }, BUBBLE_MS);
  }

  /**
   * A bubble for a `bubble` event: avatar, name, gift and a big "x N" combo.
   * The same sender sending the same gift again in a combo (`combo` > 1) while
   * their bubble is still up grows that bubble's "x N" instead of adding one.
   */
  function showBubble(ev, catalog) {
    const layer = $('#bubbles');
    if (!layer) return;
    const from = obj(ev.from);
    const count = Math.max(1, num(ev.count) || 1);
    const combo = Math.max(1, num(ev.combo) || 1);
    const key = str(ev.room) + '\n' + (str(from.user) || displayName(from)) + '\n' + str(ev.gift);
    const prev = onStage.get(key);
    if (prev && combo > 1 && !prev.leaving && prev.el.parentNode === layer) {
      if (combo > prev.combo) {
        prev.combo = combo;
        comboText(prev.comboEl, combo, true);
      }
      prev.countEl.textContent = count > 1 ? ' ×' + count : '';
      bubbleTimer(prev);
      return;
    }
    const b = el('div', 'bubble');
    const body = el('div', 'bubble-body');
    body.append(el('div', 'bubble-name', displayName(from)));
    const line = el('div', 'bubble-gift');
    const countEl = el('span', 'bubble-count', count > 1 ? ' ×' + count : '');
    line.append(el('span', 'bubble-sent', 'sent '), el('span', 'bubble-gift-name', catalog.name(ev.gift)), countEl);
    body.append(line);
    const comboEl = el('span', 'bubble-combo');
    comboText(comboEl, combo, false);
    const pill = el('div', 'bubble-pill');
    pill.append(avatar(from, 38), body, giftIcon(ev.gift, 36));
    b.append(pill, comboEl);
    layer.append(b);
    while (layer.childElementCount > MAX_BUBBLES) layer.firstElementChild.remove();
    const entry = { key: key, el: b, comboEl: comboEl, countEl: countEl, combo: combo, leaving: false, timer: null };
    onStage.set(key, entry);
    bubbleTimer(entry);
  }

  /** Handlers for the events both pages show for their current room. */
  function roomEvents(client, currentRoom, catalog, onLive) {
    const mine = (ev) => ev.room === undefined || ev.room === currentRoom();
    client.on('bubble', (ev) => {
      if (mine(ev)) showBubble(ev, catalog);
    });
    client.on('presence', (ev) => {
      if (mine(ev)) setText('#viewers', fmt(ev.viewers));
    });
    client.on('top', (ev) => {
      if (mine(ev)) renderTop(ev.top);
    });
    client.on('live', (ev) => {
      if (mine(ev)) onLive(ev);
    });
    client.on('balance', (ev) => setBalance(ev.coins));
  }

  /** Asks for the catalog and the balance; resolves once the catalog is in. */
  function loadCommon(client, catalog, afterCatalog) {
    client.request('balance').then((r) => setBalance(r.coins))
      .catch((e) => toast('Balance: ' + errText(e)));
    return client.request('catalog').then((r) => {
      catalog.set(r.gifts);
      if (afterCatalog) afterCatalog();
    }).catch((e) => toast('Catalog: ' + errText(e)));
  }

  // --------------------------------------------------------- the coin economy

  const EFFECT_KINDS = new Set(['confetti', 'fireworks', 'crown']); // others: a sparkle
  const EFFECT_MS = 2800; // on screen, then removed
  const MAX_EFFECTS = 3; // playing at once; the oldest makes way
  const CONFETTI = ['#ff3d7f', '#7c5cff', '#ffd166', '#31d08a', '#00c4ff', '#ff8a3d', '#ffffff'];
  const METRICS = { gifts: 'gifts', gift_coins: 'coins gifted', gifters: 'gifters' };
  const PRODUCT_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const MAX_ORDERS = 200;

  const plural = (n, one, many) => fmt(n) + ' ' + (n === 1 ? one : many);
  const coinsText = (v) => plural(v, 'coin', 'coins');
  const rand = (lo, hi) => lo + Math.random() * (hi - lo);

  /** A product picture: only an absolute https: URL is shown (never data: or http:). */
  function httpsImage(v) {
    const src = safeImageUrl(v);
    return src && /^https:/i.test(src) ? src : null;
  }

  /** A whole number typed in an input, within [lo, hi], else null. */
  function intIn(v, lo, hi) {
    const s = String(v === undefined || v === null ? '' : v).trim();
    if (!/^[0-9]+$/.test(s)) return null;
    const n = Number(s);
    return Number.isSafeInteger(n) && n >= lo && n <= hi ? n : null;
  }

  function timeText(ms) {
    if (num(ms) === null) return '';
    const d = new Date(ms);
    const sameDay = new Date().toDateString() === d.toDateString();
    return sameDay ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }

  /** Runs fn at most once per `ms`; a call inside the window runs once at its end. */
  function throttled(fn, ms) {
    let last = 0;
    let timer = null;
    return function () {
      if (timer !== null) return;
      const wait = last + ms - Date.now();
      if (wait <= 0) {
        last = Date.now();
        fn();
        return;
      }
      timer = setTimeout(() => {
        timer = null;
        last = Date.now();
        fn();
      }, wait);
    };
  }

  /**
   * A command that moves coins (`gift`, `effect`, `buy`, `refund`,
   * `campaign_create`): `args` carries one key, created before the first
   * attempt and kept for every retry after a timeout, `unavailable` or a
   * dropped connection, until an answer comes. Any other error is thrown at
   * once; after the last attempt it throws `unconfirmed`.
   */
  async function keyedRequest(client, op, args) {
    for (let attempt = 0; attempt < 6; attempt++) {
      if (attempt > 0) await sleep(Math.min(8000, 400 * Math.pow(2, attempt)));
      try {
        await client.whenReady(15000);
        return await client.request(op, args);
      } catch (e) {
        if (!RETRYABLE.has(errCode(e))) throw e;
      }
    }
    throw gErr('unconfirmed', op + ': no answer');
  }

  /** An effect's picture (effect-<id>.svg; a sparkle for others). */
  function effectIcon(id, size) {
    const i = el('span', 'fx-icon');
    i.dataset.effect = EFFECT_KINDS.has(str(id)) ? str(id) : 'sparkle';
    if (size) i.style.width = i.style.height = size + 'px';
    i.setAttribute('aria-hidden', 'true');
    return i;
  }

  /** The effects for sale, as buttons; `onBuy(effect, button)` on a click. */
  function renderEffects(effects, onBuy) {
    const box = $('#effects');
    if (!box) return;
    box.textContent = '';
    for (const fx of effects.gifts.values()) {
      const b = el('button', 'effect-btn');
      b.type = 'button';
      b.dataset.effect = str(fx.id);
      b.append(effectIcon(fx.id, 38), el('span', 'gift-name', str(fx.name) || str(fx.id)),
        el('span', 'gift-price', coinsText(fx.coins)));
      b.addEventListener('click', () => onBuy(fx, b));
      box.append(b);
    }
    if (!effects.gifts.size) box.append(el('p', 'empty', 'No effects for sale.'));
  }

  /** Buys one effect for `room`: one key, kept across retries. */
  async function buyEffect(client, room, fx) {
    try {
      const r = await keyedRequest(client, 'effect', { room: room, effect: fx.id, key: newKey() });
      setBalance(r.coins);
    } catch (e) {
      if (errCode(e) === 'unconfirmed') toast('Could not confirm the effect: check your balance before buying again');
      else toast('Effect: ' + friendlyError(e, { conflict: 'That key was already used' }));
    }
  }

  function confetti(fx) {
    for (let i = 0; i < 90; i++) {
      const p = el('span', 'fx-piece' + (i % 3 === 0 ? ' round' : ''));
      p.style.left = rand(0, 100).toFixed(1) + '%';
      p.style.background = CONFETTI[i % CONFETTI.length];
      p.style.width = rand(7, 13).toFixed(0) + 'px';
      p.style.height = rand(10, 18).toFixed(0) + 'px';
      p.style.animationDelay = rand(0, 0.9).toFixed(2) + 's';
      p.style.animationDuration = rand(1.6, 2.4).toFixed(2) + 's';
      p.style.setProperty('--sway', rand(-90, 90).toFixed(0) + 'px');
      p.style.setProperty('--spin', rand(360, 1080).toFixed(0) + 'deg');
      fx.append(p);
    }
  }

  function fireworks(fx) {
    for (let b = 0; b < 6; b++) {
      const burst = el('div', 'fx-burst');
      const delay = (b * 0.28 + rand(0, 0.12)).toFixed(2) + 's';
      burst.style.left = rand(12, 88).toFixed(1) + '%';
      burst.style.top = rand(14, 55).toFixed(1) + '%';
      burst.style.color = CONFETTI[(b * 2) % CONFETTI.length];
      burst.style.animationDelay = delay;
      const sparks = 22;
      for (let i = 0; i < sparks; i++) {
        const s = el('span', 'fx-spark');
        s.style.setProperty('--a', Math.round((360 / sparks) * i) + 'deg');
        s.style.setProperty('--d', rand(120, 200).toFixed(0) + 'px');
        s.style.animationDelay = delay;
        burst.append(s);
      }
      fx.append(burst);
    }
  }

  function crown(fx) {
    fx.append(el('div', 'fx-rays'), effectIcon('crown'));
    for (let i = 0; i < 14; i++) {
      const s = el('span', 'fx-twinkle');
      s.style.left = rand(30, 70).toFixed(1) + '%';
      s.style.top = rand(18, 60).toFixed(1) + '%';
      s.style.animationDelay = rand(0.2, 1.4).toFixed(2) + 's';
      fx.append(s);
    }
  }

  /**
   * An `effect` event: a full-screen animation for a few seconds (pure CSS;
   * pointer-events pass through), with who sent it.
   */
  function playEffect(ev, effects) {
    let layer = $('#fx');
    if (!layer) {
      layer = el('div', 'fx-layer');
      layer.id = 'fx';
      layer.setAttribute('aria-hidden', 'true');
      document.body.append(layer);
    }
    while (layer.childElementCount >= MAX_EFFECTS) layer.firstElementChild.remove();
    const id = str(ev.effect);
    const kind = EFFECT_KINDS.has(id) ? id : 'sparkle';
    const fx = el('div', 'fx fx-' + kind);
    fx.dataset.effect = id;
    if (kind === 'confetti') confetti(fx);
    else if (kind === 'fireworks') fireworks(fx);
    else if (kind === 'crown') crown(fx);
    else fx.append(effectIcon(id));
    const from = obj(ev.from);
    const cap = el('div', 'fx-caption');
    cap.append(avatar(from, 30), el('span', 'fx-name', displayName(from)), el('span', 'fx-sent', 'sent'),
      el('span', 'fx-what', effects ? effects.name(id) : id || 'an effect'));
    fx.append(cap);
    layer.append(fx);
    setTimeout(() => fx.remove(), EFFECT_MS);
  }

  /** A `sale` event: a "bought" bubble in the same lane as the gifts' bubbles. */
  function showSale(ev) {
    const layer = $('#bubbles');
    if (!layer) return;
    const from = obj(ev.from);
    const product = obj(ev.product);
    const count = Math.max(1, num(ev.count) || 1);
    const b = el('div', 'bubble sale');
    const body = el('div', 'bubble-body');
    body.append(el('div', 'bubble-name', displayName(from)));
    const line = el('div', 'bubble-gift');
    line.append(el('span', 'bubble-sent', 'bought '),
      el('span', 'bubble-gift-name', str(product.name) || str(product.id) || 'a product'),
      el('span', 'bubble-count', count > 1 ? ' ×' + count : ''));
    body.append(line);
    const pill = el('div', 'bubble-pill');
    const bag = el('span', 'bag-icon');
    bag.setAttribute('aria-hidden', 'true');
    pill.append(avatar(from, 38), body, bag);
    b.append(pill);
    layer.append(b);
    while (layer.childElementCount > MAX_BUBBLES) layer.firstElementChild.remove();
    bubbleTimer({ key: null, el: b, leaving: false, timer: null });
  }

  /** A product's picture: the https image when it loads, else a shopping bag. */
  function productPic(p, cls) {
    const pic = el('div', cls);
    const bag = el('span', 'bag-icon');
    bag.setAttribute('aria-hidden', 'true');
    pic.append(bag);
    const src = httpsImage(obj(p).image);
    if (src && !failedAvatars.has(src)) {
      const img = new Image();
      img.alt = '';
      img.referrerPolicy = 'no-referrer';
      img.onload = () => {
        pic.textContent = '';
        pic.append(img);
      };
      img.onerror = () => failedAvatars.add(src);
      img.src = src;
    }
    return pic;
  }

  /**
   * The pinned product's card on the stage (#pinned): picture, name, price,
   * stock, and with `onBuy` a Buy button ("Sold out" when the stock is 0).
   */
  function renderPinned(p, onBuy, busy) {
    const box = $('#pinned');
    if (!box) return;
    box.textContent = '';
    if (!isObj(p) || !str(p.id)) {
      box.hidden = true;
      box.dataset.product = '';
      return;
    }
    const stock = num(p.stock);
    const soldOut = stock !== null && stock <= 0;
    box.hidden = false;
    box.dataset.product = str(p.id);
    box.className = 'pinned' + (soldOut ? ' sold-out' : '');
    const info = el('div', 'pinned-info');
    info.append(el('div', 'pinned-tag', soldOut ? 'Sold out' : 'Pinned'),
      el('div', 'pinned-name', str(p.name) || str(p.id)),
      el('div', 'pinned-price', coinsText(p.coins)),
      el('div', 'pinned-stock', soldOut ? 'none left' : stock === null ? '' : fmt(stock) + ' left'));
    box.append(productPic(p, 'pinned-pic'), info);
    if (onBuy) {
      const b = el('button', 'primary buy', soldOut ? 'Sold out' : busy ? 'Buying…' : 'Buy');
      b.type = 'button';
      b.disabled = soldOut || !!busy;
      b.addEventListener('click', () => onBuy(p));
      box.append(b);
    }
  }

  /** A campaign's metric, in words: "gifts", "coins gifted", "gifters". */
  function metricText(m) {
    return Object.prototype.hasOwnProperty.call(METRICS, str(m)) ? METRICS[str(m)] : str(m);
  }

  /** A progress bar: `value` of `max`, with its label. */
  function progressBar(value, max, label, done) {
    const v = Math.max(0, num(value) || 0);
    const m = Math.max(1, num(max) || 1);
    const pct = Math.min(100, (v / m) * 100);
    const wrap = el('div', 'progress' + (done ? ' done' : ''));
    const bar = el('div', 'bar');
    bar.setAttribute('role', 'progressbar');
    bar.setAttribute('aria-valuemin', '0');
    bar.setAttribute('aria-valuemax', String(m));
    bar.setAttribute('aria-valuenow', String(Math.min(v, m)));
    const fill = el('div', 'bar-fill');
    fill.style.width = pct.toFixed(1) + '%';
    bar.append(fill);
    wrap.append(bar, el('div', 'progress-label', label));
    return wrap;
  }

  function statusChip(status) {
    const s = str(status) || 'unknown';
    const c = el('span', 'chip ' + s.replace(/[^a-z_]/g, ''), s.replace(/_/g, ' '));
    return c;
  }

  /**
   * A `reward` event once: it reaches a creator both on their own connections
   * and in their room, so the second copy is dropped (one reward per creator
   * and campaign).
   */
  function firstReward(seen, ev) {
    const id = str(ev.campaign) + '\n' + (str(obj(ev.creator).user) || str(ev.creator));
    if (seen.has(id)) return false;
    seen.add(id);
    return true;
  }

  function quoted(title) {
    return '“' + (str(title) || 'a campaign') + '”';
  }

  /** Room events of the economy: effects play, sales bubble up, the pinned card follows. */
  function economyEvents(client, currentRoom, effects, h) {
    const mine = (ev) => ev.room === undefined || ev.room === currentRoom();
    client.on('effect', (ev) => {
      if (mine(ev)) playEffect(ev, effects);
    });
    client.on('sale', (ev) => {
      if (!mine(ev)) return;
      showSale(ev);
      if (h.onSale) h.onSale(ev);
    });
    client.on('pinned', (ev) => {
      if (mine(ev) && h.onPinned) h.onPinned(isObj(ev.product) ? ev.product : null);
    });
  }

  // ------------------------------------------------------------- index page

  function indexPage() {
    const p = new URLSearchParams(location.search);
    const room = p.get('room');
    const creator = p.get('creator');
    const viewer = p.get('viewer');
    const label = (token, fallback) => {
      const c = decodeJwt(token);
      return str(c.name).trim() || str(c.sub) || fallback;
    };
    if (creator) {
      const a = $('#creator-link');
      a.href = '/creator.html?token=' + encodeURIComponent(creator);
      setText('#creator-as', 'as ' + label(creator, 'creator'));
      a.hidden = false;
    }
    if (viewer) {
      const a = $('#viewer-link');
      a.href = '/viewer.html?token=' + encodeURIComponent(viewer) +
        (room ? '&room=' + encodeURIComponent(room) : '');
      setText('#viewer-as', 'as ' + label(viewer, 'viewer') + (room ? ', watching ' + room : ''));
      const who = validRoom(decodeJwt(viewer).sub);
      if (who) setText('#topup-user', who);
      a.hidden = false;
    }
    const brand = p.get('brand');
    if (brand) {
      const a = $('#brand-link');
      a.href = '/brand.html?token=' + encodeURIComponent(brand);
      setText('#brand-as', 'as ' + label(brand, 'brand'));
      a.hidden = false;
    }
    if (creator || viewer || brand) $('#links').hidden = false;
    if (!creator || !viewer) $('#howto').hidden = false;
  }

  // ------------------------------------------------------------- viewer page

  function viewerPage() {
    const page = startPage();
    if (!page) return;
    const client = page.client;
    const catalog = makeCatalog();
    const effects = makeCatalog();
    const rewards = new Set();
    const st = {
      room: validRoom(page.params.get('room')),
      joined: null,
      live: false,
      count: 1,
      pinned: null, // the room's pinned product, as last seen
      buying: false,
    };
    const form = $('#room-form');
    const input = $('#room-input');
    const inRoom = () => st.joined !== null && st.joined === st.room;

    function updateGiftButtons() {
      const enabled = inRoom() && st.live;
      for (const b of document.querySelectorAll('#catalog button')) b.disabled = !enabled;
      // Effects: any member of a live room, its creator included.
      for (const b of document.querySelectorAll('#effects button')) b.disabled = !enabled;
      let note = '';
      if (!st.room) note = 'Enter a room to watch.';
      else if (st.room === page.me.sub) note = 'This is your own room: you cannot gift yourself.';
      else if (st.joined === st.room && !st.live) note = 'The creator is not live yet: waiting…';
      setText('#stage-note', note);
    }

    function renderCatalog() {
      const box = $('#catalog');
      box.textContent = '';
      for (const g of catalog.gifts.values()) {
        const b = el('button', 'gift');
        b.type = 'button';
        b.dataset.gift = str(g.id);
        b.append(giftIcon(g.id, 44), el('span', 'gift-name', str(g.name) || str(g.id)),
          el('span', 'gift-price', fmt(g.coins) + (g.coins === 1 ? ' coin' : ' coins')));
        b.addEventListener('click', () => {
          b.classList.remove('pop');
          void b.offsetWidth; // restart the press animation
          b.classList.add('pop');
          sendGift(g);
        });
        box.append(b);
      }
      if (!catalog.gifts.size) box.append(el('p', 'empty', 'No gifts in the catalog.'));
      updateGiftButtons();
    }

    function loadEffects() {
      client.request('effects').then((r) => {
        effects.set(r.effects);
        renderEffects(effects, (fx, b) => {
          b.classList.remove('pop');
          void b.offsetWidth;
          b.classList.add('pop');
          if (st.room) buyEffect(client, st.room, fx);
        });
        updateGiftButtons();
      }).catch((e) => toast('Effects: ' + errText(e)));
    }

    /** The pinned card; no Buy button in one's own room (a shop cannot buy from itself). */
    function renderCard() {
      const own = st.room === page.me.sub;
      renderPinned(st.pinned, own ? null : buy, st.buying);
    }

    function resetRoomView() {
      st.live = false;
      st.pinned = null;
      setText('#room-title', st.room || 'No room');
      setText('#room-subtitle', '');
      setText('#viewers', '—');
      renderLive(false);
      renderTop([]);
      renderCard();
      const layer = $('#bubbles');
      if (layer) layer.textContent = '';
      if (input && st.room) input.value = st.room;
      document.title = 'gifting — ' + (st.room || 'viewer');
      updateGiftButtons();
    }

    async function joinRoom() {
      const room = st.room;
      if (!room) return;
      try {
        const r = await client.request('join', { room: room });
        if (room !== st.room) return;
        st.joined = room;
        st.live = r.live === true;
        st.pinned = isObj(r.pinned) ? r.pinned : null;
        renderLive(st.live, r.title);
        setText('#viewers', fmt(r.viewers));
        renderTop(r.top);
        renderCard();
        updateGiftButtons();
        client.setReady(true);
      } catch (e) {
        if (room === st.room) toast('Could not join ' + room + ': ' + errText(e));
      }
    }

    function switchRoom(room) {
      if (room === st.room && st.joined === room) return;
      const old = st.joined;
      st.room = room;
      st.joined = null;
      client.setReady(false);
      const url = new URL(location.href);
      url.searchParams.set('room', room);
      history.replaceState(null, '', url.href);
      resetRoomView();
      if (old && client.isOpen()) client.request('leave', { room: old }).catch(() => {});
      if (client.isOpen()) joinRoom();
    }

    /** One gift, one key: retried with the same key until it has an answer. */
    async function sendGift(g) {
      const room = st.room;
      if (!room) {
        toast('Join a room first');
        return;
      }
      try {
        const r = await keyedRequest(client, 'gift', { room: room, gift: g.id, count: st.count, key: newKey() });
        setBalance(r.coins);
        if (r.duplicate === true) toast('That gift was already delivered', 'info');
      } catch (e) {
        if (errCode(e) === 'unconfirmed') toast('Could not confirm the gift: check your balance before sending again');
        else toast(friendlyError(e));
      }
    }

    /** The card's product again from the shop (after `price_changed`). */
    async function refreshPinned(room, id) {
      try {
        const r = await client.request('products', { shop: room });
        if (room !== st.room || !st.pinned || str(st.pinned.id) !== id) return;
        const fresh = arr(r.products).find((p) => isObj(p) && str(p.id) === id);
        st.pinned = fresh || null;
        renderCard();
      } catch (e) {
        toast('Could not refresh the product: ' + errText(e));
      }
    }

    /** One unit at the price on the card; one key, kept across retries. */
    async function buy(p) {
      const room = st.room;
      const id = str(p.id);
      if (!room || st.buying) return;
      st.buying = true;
      renderCard();
      try {
        const r = await keyedRequest(client, 'buy',
          { shop: room, product: id, count: 1, coins: p.coins, key: newKey() });
        setBalance(r.coins);
        if (st.pinned && str(st.pinned.id) === id && num(r.stock) !== null) st.pinned.stock = r.stock;
        toast(r.duplicate === true ? 'That order was already placed'
          : 'You bought ' + (str(p.name) || id) + ' for ' + coinsText(p.coins), 'info');
      } catch (e) {
        const code = errCode(e);
        if (code === 'unconfirmed') {
          toast('Could not confirm the purchase: check your orders before buying again');
        } else if (code === 'price_changed') {
          toast('The price has changed: check the new price before buying');
          refreshPinned(room, id);
        } else if (code === 'sold_out') {
          if (st.pinned && str(st.pinned.id) === id) st.pinned.stock = 0;
          toast('Sold out: ' + (str(p.name) || id));
        } else {
          toast('Buy: ' + friendlyError(e, { forbidden: 'You cannot buy from your own shop' }));
        }
      } finally {
        st.buying = false;
        if (room === st.room) renderCard();
      }
    }

    for (const b of document.querySelectorAll('#counts button')) {
      b.addEventListener('click', () => {
        st.count = parseInt(b.dataset.count, 10) || 1;
        for (const o of document.querySelectorAll('#counts button')) {
          o.setAttribute('aria-pressed', o === b ? 'true' : 'false');
        }
      });
    }
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const room = input.value.trim();
      if (!validRoom(room)) {
        toast('A room id is 1–64 letters, digits, _ or -');
        return;
      }
      switchRoom(room);
    });

    roomEvents(client, () => st.room, catalog, (ev) => {
      st.live = ev.live === true;
      renderLive(st.live, ev.title);
      // A pin lasts one live session: the hub drops it at end_live without a `pinned` event.
      if (!st.live && st.pinned) {
        st.pinned = null;
        renderCard();
      }
      updateGiftButtons();
    });
    economyEvents(client, () => st.room, effects, {
      onSale: (ev) => {
        const product = obj(ev.product);
        if (st.pinned && str(st.pinned.id) === str(product.id) && num(ev.stock) !== null) {
          st.pinned.stock = ev.stock;
          renderCard();
        }
      },
      onPinned: (product) => {
        st.pinned = product;
        renderCard();
      },
    });
    client.on('reward', (ev) => {
      const creator = obj(ev.creator);
      const brand = displayName(ev.brand);
      if (str(creator.user) === page.me.sub) {
        if (firstReward(rewards, ev)) {
          toast('Reward: +' + coinsText(ev.coins) + ' from ' + brand + ' for ' + quoted(ev.title), 'reward');
        }
      } else if (ev.room !== undefined && ev.room === st.room && firstReward(rewards, ev)) {
        toast(displayName(creator) + ' reached ' + brand + '’s goal ' + quoted(ev.title) +
          ': +' + coinsText(ev.coins), 'reward');
      }
    });
    client.onOpen = () => {
      st.joined = null;
      loadCommon(client, catalog, renderCatalog);
      loadEffects();
      joinRoom();
    };
    resetRoomView();
    if (!st.room && input) input.focus();
    client.connect();
  }

  // ------------------------------------------------------------ creator page

  function creatorPage() {
    const page = startPage();
    if (!page) return;
    const client = page.client;
    const catalog = makeCatalog();
    const room = validRoom(page.me.sub);
    if (!room) {
      setStatus('bad', 'Bad token');
      toast('Cannot read the user id (sub) from this token');
      return;
    }
    const storeKey = 'gifting.feed.' + room;
    const st = {
      live: false,
      session: null,
      total: null,
      seen: new Set(),
      lastOffset: loadOffset(),
      catchingUp: false,
      buffer: [],
      liveRows: 0, // rows on top that arrived live during the catch-up
    };
    setText('#room-title', room);
    document.title = 'gifting — creator ' + room;

    function loadOffset() {
      try {
        const v = JSON.parse(localStorage.getItem(storeKey));
        return typeof v === 'string' || typeof v === 'number' ? v : null;
      } catch (_) {
        return null;
      }
    }

    function saveOffset(v) {
      st.lastOffset = v;
      try {
        localStorage.setItem(storeKey, JSON.stringify(v));
      } catch (_) { /* private mode: memory only */ }
    }

    function renderState() {
      renderLive(st.live);
      $('#go-live').disabled = st.live;
      $('#end-live').disabled = !st.live;
      setText('#total', fmt(st.total === null ? 0 : st.total));
      setText('#session', st.session === null ? '—' : String(st.session));
      setText('#stage-note', st.live ? '' : 'You are offline: press Go live to start');
      for (const b of document.querySelectorAll('#products .pin-btn')) {
        b.disabled = !st.live;
        b.title = st.live ? '' : 'Go live to pin a product';
      }
      for (const b of document.querySelectorAll('#effects button')) b.disabled = !st.live;
    }

    /** Adds a `gift` feed entry once (by transfer id); true when it was new. */
    function addEntry(e, fresh, render) {
      if (!isObj(e)) return false;
      const transfer = str(e.transfer);
      if (transfer) {
        if (st.seen.has(transfer)) return false;
        st.seen.add(transfer);
      }
      if (num(e.total) !== null) st.total = e.total;
      if (render === false) return true;
      const list = $('#feed');
      const empty = $('.empty', list);
      if (empty) empty.remove();
      const from = obj(e.from);
      const li = el('li', fresh ? 'fresh' : '');
      const what = el('div', 'feed-what');
      what.append(el('span', 'feed-name', displayName(from)),
        el('span', 'feed-gift', ' sent ' + catalog.name(e.gift) + ' ×' + (num(e.count) || 1)),
        giftIcon(e.gift, 20));
      const paid = el('div', 'feed-paid', 'paid ' + fmt(e.coins));
      const earned = el('div', 'feed-earned', '+' + fmt(e.earned));
      li.append(avatar(from, 32), what, paid, earned);
      if (fresh) {
        list.prepend(li);
        if (st.catchingUp) st.liveRows++;
      } else {
        // Catch-up entries are older than anything that arrived live meanwhile.
        list.insertBefore(li, list.children[st.liveRows] || null);
      }
      while (list.childElementCount > MAX_FEED_ROWS) list.lastElementChild.remove();
      return true;
    }

    /**
     * A live `gift` event shows at once. While the feed is being caught up its
     * offset waits in `buffer`: offsets are opaque, so the stored one only
     * moves past the catch-up's cursor once the catch-up is complete.
     */
    function onGiftEvent(ev) {
      if (ev.room !== undefined && ev.room !== room) return;
      addEntry(ev, true);
      if (st.catchingUp) st.buffer.push(ev);
      else if (ev.offset !== undefined) saveOffset(ev.offset);
      renderState();
    }

    /** Fetches every gift after the last offset seen, page by page. */
    async function catchUp(gen, fromFeed) {
      let after = st.lastOffset;
      for (;;) {
        const args = { room: room, limit: FEED_PAGE };
        if (after !== null) args.after = after;
        const r = await client.request('feed', args);
        if (gen !== client.gen) return;
        const entries = arr(r.entries);
        for (const e of entries) fromFeed.add(str(obj(e).transfer));
        // Only the newest rows stay on screen: don't build the ones that would be trimmed.
        entries.forEach((e, i) => addEntry(e, false, i >= entries.length - MAX_FEED_ROWS));
        renderState();
        const last = obj(entries[entries.length - 1]);
        const next = [r.next, last.offset].find((v) => typeof v === 'string' || typeof v === 'number');
        if (next !== undefined && next !== after) {
          saveOffset(next);
          after = next;
        } else if (entries.length >= FEED_PAGE) {
          break; // no progress: avoid looping forever
        }
        if (entries.length < FEED_PAGE) break;
      }
    }

    /** Catch-up done: the newest live event it did not cover is the offset. */
    function finishCatchUp(fromFeed) {
      for (const ev of st.buffer) {
        if (!fromFeed.has(str(ev.transfer)) && ev.offset !== undefined) saveOffset(ev.offset);
      }
      st.buffer = [];
      st.catchingUp = false;
      renderState();
    }

    async function onOpen(gen) {
      st.catchingUp = true;
      st.buffer = [];
      st.liveRows = 0;
      const catalogIn = loadCommon(client, catalog, null);
      try {
        const r = await client.request('join', { room: room });
        if (gen !== client.gen) return;
        st.live = r.live === true;
        if (num(r.session) !== null) st.session = r.session;
        shop.pinned = isObj(r.pinned) ? r.pinned : null;
        setText('#viewers', fmt(r.viewers));
        renderTop(r.top);
        renderCard();
        renderState();
        client.setReady(true);
      } catch (e) {
        if (gen === client.gen) toast('Could not join your room: ' + errText(e));
      }
      if (gen === client.gen) onEconomyOpen();
      await catalogIn; // so that feed rows show gift names
      const fromFeed = new Set();
      for (let attempt = 0; gen === client.gen; attempt++) {
        try {
          await catchUp(gen, fromFeed);
          if (gen === client.gen) finishCatchUp(fromFeed);
          return;
        } catch (e) {
          if (gen !== client.gen || errCode(e) === 'disconnected') return; // the next connection redoes it
          if (attempt === 0) toast('Feed: ' + errText(e) + ': retrying');
          await sleep(Math.min(MAX_BACKOFF_MS, 1000 * Math.pow(2, attempt)));
        }
      }
    }

    // ---- shop: products, the pinned one, orders

    const shop = {
      products: new Map(), // id -> product, in the shop's order
      pinned: null, // the pinned product, as the room last said
      orders: new Map(), // order id -> {entry, li}
      campaigns: [],
    };
    const effects = makeCatalog();
    const rewards = new Set();

    function productName(id) {
      const p = shop.products.get(str(id));
      return p ? str(p.name) || str(p.id) : str(id) || 'a product';
    }

    function renderCard() {
      renderPinned(shop.pinned, null);
    }

    /** A pin lasts one live session: the hub drops it at end_live without a `pinned` event. */
    function unpinLocally() {
      if (!shop.pinned) return;
      shop.pinned = null;
      renderCard();
      renderProducts();
    }

    function renderProducts() {
      const list = $('#products');
      if (!list) return;
      list.textContent = '';
      if (!shop.products.size) {
        list.append(el('li', 'empty', 'No products yet: add one above'));
        return;
      }
      const pinnedId = shop.pinned ? str(shop.pinned.id) : '';
      for (const p of shop.products.values()) {
        const id = str(p.id);
        const stock = num(p.stock);
        const li = el('li', 'product' + (id === pinnedId ? ' is-pinned' : '') + (stock === 0 ? ' sold-out' : ''));
        li.dataset.product = id;
        const info = el('div', 'product-info');
        const name = el('div', 'product-name', str(p.name) || id);
        if (id === pinnedId) name.append(el('span', 'chip pinned-chip', 'pinned'));
        info.append(name, el('div', 'product-meta', id + ' · ' + coinsText(p.coins)));
        const stockEl = el('div', 'product-stock', stock === 0 ? 'sold out' : fmt(stock) + ' in stock');
        const restock = el('form', 'restock');
        const qty = el('input');
        qty.type = 'number';
        qty.min = '0';
        qty.max = '1000000000';
        qty.placeholder = 'stock';
        qty.className = 'restock-input';
        qty.setAttribute('aria-label', 'New stock for ' + (str(p.name) || id));
        const save = el('button', 'restock-btn', 'Restock');
        save.type = 'submit';
        restock.append(qty, save);
        restock.addEventListener('submit', (e) => {
          e.preventDefault();
          const n = intIn(qty.value, 0, 1e9);
          if (n === null) {
            toast('Stock is a whole number from 0 to 1,000,000,000');
            return;
          }
          putProduct({ id: id, name: p.name, coins: p.coins, stock: n, image: p.image }, 'Restocked');
        });
        const pin = el('button', 'pin-btn' + (id === pinnedId ? ' on' : ''), id === pinnedId ? 'Unpin' : 'Pin');
        pin.type = 'button';
        pin.disabled = !st.live;
        pin.title = st.live ? '' : 'Go live to pin a product';
        pin.addEventListener('click', () => pinProduct(id === pinnedId ? null : id));
        li.append(productPic(p, 'product-pic'), info, stockEl, restock, pin);
        list.append(li);
      }
    }

    async function loadProducts() {
      try {
        const r = await client.request('products', { shop: room });
        shop.products.clear();
        for (const p of arr(r.products)) if (isObj(p) && str(p.id)) shop.products.set(str(p.id), p);
        if (shop.pinned && shop.products.has(str(shop.pinned.id))) {
          shop.pinned = Object.assign({}, shop.products.get(str(shop.pinned.id)));
          renderCard();
        }
        renderProducts();
        renderOrders();
      } catch (e) {
        toast('Products: ' + errText(e));
      }
    }
    const refreshProducts = throttled(loadProducts, 1000);

    async function putProduct(p, done) {
      const args = { product: p.id, name: p.name, coins: p.coins, stock: p.stock };
      if (p.image) args.image = p.image;
      try {
        const r = await client.request('product_put', args);
        const saved = isObj(r.product) ? r.product : Object.assign({ image: null }, p);
        shop.products.set(str(saved.id), saved);
        if (shop.pinned && str(shop.pinned.id) === str(saved.id)) {
          shop.pinned = Object.assign({}, saved);
          renderCard();
        }
        renderProducts();
        toast(done + ': ' + (str(saved.name) || str(saved.id)) + ', ' + fmt(saved.stock) + ' in stock', 'info');
        return true;
      } catch (e) {
        toast('Product: ' + friendlyError(e));
        return false;
      }
    }

    async function pinProduct(id) {
      try {
        await client.request('pin', { product: id });
        shop.pinned = id === null ? null : Object.assign({}, shop.products.get(id) || { id: id });
        renderCard();
        renderProducts();
      } catch (e) {
        toast((id === null ? 'Unpin: ' : 'Pin: ') + friendlyError(e, { not_live: 'Go live to pin a product' }));
      }
    }

    $('#product-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const id = $('#product-id').value.trim();
      const name = $('#product-name').value.trim();
      const coins = intIn($('#product-price').value, 1, 1e9);
      const stock = intIn($('#product-stock').value, 0, 1e9);
      const image = $('#product-image').value.trim();
      let bad = '';
      if (!PRODUCT_RE.test(id)) bad = 'A product id is 1–64 letters, digits, _ or -';
      else if (!name || name.length > 80) bad = 'A product name is 1–80 characters';
      else if (coins === null) bad = 'The price is a whole number of coins from 1 to 1,000,000,000';
      else if (stock === null) bad = 'Stock is a whole number from 0 to 1,000,000,000';
      else if (image && !httpsImage(image)) bad = 'The image must be an https: URL';
      if (bad) {
        toast(bad);
        return;
      }
      const existed = shop.products.has(id);
      if (await putProduct({ id: id, name: name, coins: coins, stock: stock, image: image || null },
        existed ? 'Replaced' : 'Added')) {
        $('#product-form').reset();
      }
    });

    function orderRow(entry) {
      const id = str(entry.order);
      const status = str(entry.status) || 'paid';
      const li = el('li', 'order ' + status);
      li.dataset.order = id;
      li.dataset.status = status;
      const buyer = obj(entry.buyer);
      const what = el('div', 'order-what');
      const count = num(entry.count) || 1;
      what.append(el('span', 'feed-name', displayName(buyer)),
        el('span', 'order-product', ' bought ' + productName(entry.product) + ' ×' + count));
      const meta = el('div', 'order-meta', timeText(entry.time));
      const coins = el('div', 'order-coins', fmt(entry.coins));
      const cell = el('div', 'order-action');
      if (status === 'paid') {
        const b = el('button', 'refund-btn', 'Refund');
        b.type = 'button';
        b.addEventListener('click', () => refund(entry.order, b)); // the id as the hub gave it
        cell.append(b);
      }
      li.append(avatar(buyer, 30), what, meta, coins, statusChip(status), cell);
      return li;
    }

    /** Adds or updates an order; new ones go on top unless `older`. */
    function putOrder(entry, fresh, older) {
      if (!isObj(entry) || !str(entry.order)) return;
      const id = str(entry.order);
      const list = $('#orders');
      const known = shop.orders.get(id);
      const li = orderRow(entry);
      if (known) {
        if (known.li.parentNode === list) list.insertBefore(li, known.li);
        known.li.remove();
      } else {
        const empty = $('.empty', list);
        if (empty) empty.remove();
        if (older) list.append(li);
        else list.prepend(li);
        if (fresh) li.classList.add('fresh');
      }
      shop.orders.set(id, { entry: entry, li: li });
      while (list.childElementCount > MAX_ORDERS) {
        const last = list.lastElementChild;
        shop.orders.delete(last.dataset.order);
        last.remove();
      }
    }

    /** Product names may have come in after the orders: rows are redrawn. */
    function renderOrders() {
      for (const o of shop.orders.values()) putOrder(o.entry, false, false);
    }

    async function loadOrders() {
      try {
        const r = await client.request('orders', { role: 'seller', limit: 50 });
        const list = $('#orders');
        list.textContent = '';
        shop.orders.clear();
        for (const e of arr(r.entries)) putOrder(e, false, true); // newest first
        if (!shop.orders.size) list.append(el('li', 'empty', 'No orders yet'));
      } catch (e) {
        toast('Orders: ' + errText(e));
      }
    }

    async function refund(order, button) {
      const known = shop.orders.get(str(order));
      button.disabled = true;
      button.textContent = 'Refunding…';
      try {
        const r = await keyedRequest(client, 'refund', { order: order, key: newKey() });
        const entry = Object.assign({}, known ? known.entry : { order: order }, { status: str(r.status) || 'refunded' });
        putOrder(entry, false, false);
        toast('Refunded ' + coinsText(entry.coins) + ' to ' + displayName(entry.buyer), 'info');
        client.request('balance').then((b) => setBalance(b.coins)).catch(() => {});
        refreshProducts(); // the stock is back
      } catch (e) {
        button.disabled = false;
        button.textContent = 'Refund';
        if (errCode(e) === 'unconfirmed') toast('Could not confirm the refund: reload the orders before trying again');
        else {
          toast('Refund: ' + friendlyError(e, {
            conflict: 'That order was already refunded',
            insufficient_funds: 'Your balance cannot cover this refund',
          }));
        }
      }
    }

    // ---- campaigns

    function campaignCard(c) {
      const li = el('li', 'campaign ' + str(c.status));
      li.dataset.campaign = str(c.id);
      const head = el('div', 'campaign-head');
      head.append(el('span', 'campaign-title', str(c.title) || str(c.id)), statusChip(c.status));
      const reward = el('div', 'campaign-meta', 'by ' + displayName(c.brand) + ' · +' + coinsText(c.reward) +
        ' at ' + fmt(c.threshold) + ' ' + metricText(c.metric));
      li.append(head, reward);
      if (c.joined === true) {
        const progress = Math.min(num(c.progress) || 0, num(c.threshold) || 0);
        const label = c.rewarded === true ? 'Rewarded +' + coinsText(c.reward)
          : fmt(num(c.progress) || 0) + ' / ' + fmt(c.threshold) + ' ' + metricText(c.metric);
        li.append(progressBar(c.rewarded === true ? c.threshold : progress, c.threshold, label, c.rewarded === true));
        if (num(c.ends) !== null) li.append(el('div', 'campaign-ends', 'ends ' + timeText(c.ends)));
      } else if (str(c.status) === 'open') {
        const b = el('button', 'primary join-btn', 'Join');
        b.type = 'button';
        b.addEventListener('click', () => joinCampaign(str(c.id), b));
        const row = el('div', 'campaign-join');
        row.append(el('span', 'campaign-ends', num(c.ends) === null ? '' : 'ends ' + timeText(c.ends)), b);
        li.append(row);
      }
      return li;
    }

    function renderCampaigns() {
      const list = $('#campaigns');
      if (!list) return;
      list.textContent = '';
      // Joined ones first, then the open ones to join.
      const all = shop.campaigns.slice().sort((a, b) => (b.joined === true) - (a.joined === true));
      for (const c of all) list.append(campaignCard(c));
      if (!all.length) list.append(el('li', 'empty', 'No campaigns to join'));
    }

    async function loadCampaigns() {
      try {
        const r = await client.request('campaigns');
        shop.campaigns = arr(r.campaigns).filter(isObj);
        renderCampaigns();
      } catch (e) {
        toast('Campaigns: ' + errText(e));
      }
    }
    const refreshCampaigns = throttled(loadCampaigns, 1000);

    async function joinCampaign(id, button) {
      button.disabled = true;
      try {
        const r = await client.request('campaign_join', { campaign: id });
        const c = isObj(r.campaign) ? r.campaign : null;
        if (c) shop.campaigns = shop.campaigns.map((o) => (str(o.id) === id ? c : o));
        renderCampaigns();
        toast('Joined ' + quoted(c ? c.title : id), 'info');
        refreshCampaigns();
      } catch (e) {
        button.disabled = false;
        toast('Join: ' + friendlyError(e, { forbidden: 'Not allowed (at most 10 open campaigns at a time)' }));
      }
    }

    function loadEffects() {
      client.request('effects').then((r) => {
        effects.set(r.effects);
        renderEffects(effects, (fx) => buyEffect(client, room, fx));
        renderState();
      }).catch((e) => toast('Effects: ' + errText(e)));
    }

    function onEconomyOpen() {
      loadEffects();
      loadProducts();
      loadOrders();
      loadCampaigns();
    }

    economyEvents(client, () => room, effects, {
      onSale: (ev) => {
        const product = obj(ev.product);
        const id = str(product.id);
        if (num(ev.stock) === null) return;
        const p = shop.products.get(id);
        if (p) p.stock = ev.stock;
        if (shop.pinned && str(shop.pinned.id) === id) shop.pinned.stock = ev.stock;
        renderCard();
        renderProducts();
      },
      onPinned: (product) => {
        shop.pinned = product;
        renderCard();
        renderProducts();
      },
    });
    client.on('order', (ev) => {
      putOrder(ev, true, false);
      refreshProducts(); // the stock went down (a sale is only announced while live)
    });
    client.on('gift', () => refreshCampaigns());
    // New campaigns to join, and ones that closed: a slow poll shows them.
    setInterval(() => {
      if (client.isOpen() && !document.hidden) refreshCampaigns();
    }, 15000);
    client.on('reward', (ev) => {
      const creator = obj(ev.creator);
      if (str(creator.user) !== room && str(ev.creator) !== room) return;
      if (!firstReward(rewards, ev)) return;
      toast('Reward: +' + coinsText(ev.coins) + ' from ' + displayName(ev.brand) + ' for ' + quoted(ev.title), 'reward');
      refreshCampaigns();
    });

    $('#go-live').addEventListener('click', async () => {
      const title = $('#title-input').value.trim();
      try {
        const r = await client.request('go_live', title ? { title: title } : {});
        st.live = true;
        st.total = 0;
        if (num(r.session) !== null) st.session = r.session;
        setText('#room-subtitle', title);
        setText('#last-session', '');
        renderState();
        refreshCampaigns(); // progress counts per session
        toast('You are live', 'info');
      } catch (e) {
        toast('Go live: ' + friendlyError(e));
      }
    });

    $('#end-live').addEventListener('click', async () => {
      try {
        const r = await client.request('end_live');
        st.live = false;
        unpinLocally();
        renderState();
        setText('#last-session', 'Last session earned ' + fmt(r.coins) + ' coins');
        toast('Live ended: you earned ' + fmt(r.coins) + ' coins', 'info');
      } catch (e) {
        toast('End live: ' + friendlyError(e));
      }
    });

    roomEvents(client, () => room, catalog, (ev) => {
      const live = ev.live === true;
      if (live && num(ev.session) !== null && ev.session !== st.session) st.total = 0;
      st.live = live;
      if (num(ev.session) !== null) st.session = ev.session;
      if (typeof ev.title === 'string') setText('#room-subtitle', ev.title);
      if (!live) unpinLocally();
      else refreshCampaigns(); // progress counts per session
      renderState();
    });
    client.on('gift', onGiftEvent);
    client.onOpen = onOpen;
    renderState();
    renderTop([]);
    client.connect();
  }

  // -------------------------------------------------------------- brand page

  function brandPage() {
    const page = startPage();
    if (!page) return;
    const client = page.client;
    const me = validRoom(page.me.sub);
    if (!me) {
      setStatus('bad', 'Bad token');
      toast('Cannot read the user id (sub) from this token');
      return;
    }
    if (page.me.brand !== true) $('#not-brand').hidden = false;
    document.title = 'gifting — brand ' + (str(page.me.name) || me);
    const storeKey = 'gifting.rewarded.' + me;
    const rewards = new Set();
    const st = { campaigns: [], rewarded: loadRewarded(), creating: false };

    /** Rewarded creators by campaign, kept in localStorage: `campaigns` has only counts. */
    function loadRewarded() {
      try {
        const v = JSON.parse(localStorage.getItem(storeKey));
        return isObj(v) ? v : {};
      } catch (_) {
        return {};
      }
    }

    function saveRewarded() {
      try {
        localStorage.setItem(storeKey, JSON.stringify(st.rewarded));
      } catch (_) { /* private mode: memory only */ }
    }

    function campaignCard(c) {
      const id = str(c.id);
      const status = str(c.status);
      const li = el('li', 'campaign brand-campaign ' + status);
      li.dataset.campaign = id;
      const head = el('div', 'campaign-head');
      head.append(el('span', 'campaign-title', str(c.title) || id), statusChip(status));
      const budget = num(c.budget) || 0;
      const escrow = num(c.escrow) || 0;
      const reward = num(c.reward) || 0;
      const meta = el('div', 'campaign-meta', id + ' · +' + coinsText(reward) + ' per creator at ' +
        fmt(c.threshold) + ' ' + metricText(c.metric) + (num(c.ends) !== null ? ' · ends ' + timeText(c.ends) : ''));
      const escrowLabel = el('span', 'escrow-label');
      escrowLabel.append(el('span', 'escrow', fmt(escrow)), el('span', 'muted', ' of ' + coinsText(budget) +
        (status === 'closed' ? ' in escrow: the rest came back to you' : ' in escrow')));
      const bar = progressBar(escrow, budget, '', status !== 'open');
      bar.classList.add('escrow-bar');
      const label = $('.progress-label', bar);
      if (label) {
        label.textContent = '';
        label.append(escrowLabel);
      }
      li.append(head, meta, bar);
      const names = arr(st.rewarded[id]);
      const paidOut = status === 'closed' ? null : reward > 0 ? Math.floor((budget - escrow) / reward) : 0;
      const count = Math.max(names.length, paidOut || 0);
      const who = el('div', 'rewarded');
      who.append(el('span', 'rewarded-count', count ? plural(count, 'creator', 'creators') + ' rewarded' : 'No creator rewarded yet'));
      const chips = el('span', 'rewarded-list');
      for (const n of names) chips.append(el('span', 'chip rewarded-chip', displayName(n)));
      who.append(chips);
      // Once closed, its escrow says nothing about rewards: only the names seen here are known.
      if (count || status !== 'closed') li.append(who);
      if (status !== 'closed') {
        const b = el('button', 'danger close-btn', 'Close');
        b.type = 'button';
        b.addEventListener('click', () => closeCampaign(id, b));
        li.append(b);
      }
      return li;
    }

    function renderCampaigns() {
      const list = $('#campaigns');
      list.textContent = '';
      const order = { open: 0, exhausted: 1, closed: 2 };
      const all = st.campaigns.slice().sort((a, b) =>
        (order[str(a.status)] ?? 3) - (order[str(b.status)] ?? 3) || (num(b.ends) || 0) - (num(a.ends) || 0));
      for (const c of all) list.append(campaignCard(c));
      if (!all.length) list.append(el('li', 'empty', 'No campaigns yet: create one'));
      const held = st.campaigns.filter((c) => str(c.status) !== 'closed').reduce((t, c) => t + (num(c.escrow) || 0), 0);
      setText('#escrow-total', fmt(held));
    }

    async function loadCampaigns() {
      try {
        const r = await client.request('campaigns');
        st.campaigns = arr(r.campaigns).filter(isObj);
        renderCampaigns();
      } catch (e) {
        toast('Campaigns: ' + errText(e));
      }
    }
    const refresh = throttled(loadCampaigns, 1000);

    async function closeCampaign(id, button) {
      button.disabled = true;
      try {
        const r = await client.request('campaign_close', { campaign: id });
        if (isObj(r.campaign)) st.campaigns = st.campaigns.map((c) => (str(c.id) === id ? r.campaign : c));
        renderCampaigns();
        toast('Closed: ' + coinsText(num(r.refunded) || 0) + ' back to your balance', 'info');
        client.request('balance').then((b) => setBalance(b.coins)).catch(() => {});
      } catch (e) {
        button.disabled = false;
        toast('Close: ' + friendlyError(e, { closed: 'That campaign is already closed' }));
      }
    }

    const form = $('#campaign-form');
    $('#c-id').value = 'c-' + newKey().slice(0, 8);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (st.creating) return;
      const id = $('#c-id').value.trim();
      const title = $('#c-title').value.trim();
      const budget = intIn($('#c-budget').value, 1, 1e15);
      const reward = intIn($('#c-reward').value, 1, 1e15);
      const metric = $('#c-metric').value;
      const threshold = intIn($('#c-threshold').value, 1, 1e9);
      const minutes = intIn($('#c-ends').value, 1, 525600);
      const creators = $('#c-creators').value.split(/[\s,]+/).filter(Boolean);
      let bad = '';
      if (!PRODUCT_RE.test(id)) bad = 'A campaign id is 1–64 letters, digits, _ or -';
      else if (!title || title.length > 80) bad = 'A title is 1–80 characters';
      else if (budget === null) bad = 'The budget is a whole number of coins';
      else if (reward === null || reward > budget) bad = 'The reward is a whole number of coins, at most the budget';
      else if (!Object.prototype.hasOwnProperty.call(METRICS, metric)) bad = 'Pick a metric';
      else if (threshold === null) bad = 'The goal is a whole number from 1 to 1,000,000,000';
      else if (minutes === null) bad = 'The campaign runs 1 minute to 1 year';
      else if (creators.length > 1000) bad = 'At most 1,000 creators';
      else if (creators.some((c) => !validRoom(c))) bad = 'Creators are user ids, separated by commas';
      if (bad) {
        toast(bad);
        return;
      }
      const args = {
        campaign: id, title: title, budget: budget, reward: reward, metric: metric,
        threshold: threshold, ends: Date.now() + minutes * 60000, key: newKey(),
      };
      if (creators.length) args.creators = creators;
      st.creating = true;
      $('#c-create').disabled = true;
      try {
        const r = await keyedRequest(client, 'campaign_create', args);
        const c = isObj(r.campaign) ? r.campaign : null;
        if (c) st.campaigns = st.campaigns.filter((o) => str(o.id) !== str(c.id)).concat([c]);
        renderCampaigns();
        toast('Campaign ' + quoted(title) + ' created: ' + coinsText(budget) + ' held in escrow', 'info');
        $('#c-id').value = 'c-' + newKey().slice(0, 8);
        client.request('balance').then((b) => setBalance(b.coins)).catch(() => {});
      } catch (err) {
        if (errCode(err) === 'unconfirmed') toast('Could not confirm the campaign: reload before creating it again');
        else {
          toast('Create: ' + friendlyError(err, {
            forbidden: 'This token is not a brand’s: mint one with --brand',
            conflict: 'That key was already used',
          }));
        }
      } finally {
        st.creating = false;
        $('#c-create').disabled = false;
      }
    });

    client.on('balance', (ev) => setBalance(ev.coins));
    client.on('reward', (ev) => {
      if (str(obj(ev.brand).user) && str(obj(ev.brand).user) !== me) return;
      if (!firstReward(rewards, ev)) return;
      const id = str(ev.campaign);
      const creator = obj(ev.creator);
      const known = arr(st.rewarded[id]);
      if (!known.some((n) => str(obj(n).user) === str(creator.user))) {
        st.rewarded[id] = known.concat([{ user: str(creator.user), name: str(creator.name) }]);
        saveRewarded();
      }
      toast(displayName(creator) + ' was rewarded ' + coinsText(ev.coins) + ' for ' + quoted(ev.title), 'reward');
      renderCampaigns();
      refresh();
    });
    client.onOpen = async (gen) => {
      client.request('balance').then((r) => setBalance(r.coins))
        .catch((e) => toast('Balance: ' + errText(e)));
      await loadCampaigns();
      if (gen === client.gen) client.setReady(true);
    };
    // Campaigns close when `ends` passes: a slow poll shows it.
    setInterval(() => {
      if (client.isOpen() && !document.hidden) refresh();
    }, 10000);
    renderCampaigns();
    client.connect();
  }

  // ---------------------------------------------------------------- startup

  const pages = { index: indexPage, viewer: viewerPage, creator: creatorPage, brand: brandPage };

  function boot() {
    const start = pages[document.body.dataset.page];
    if (start) start();
  }

  // The renderers are exported too, so that tests can run them on hostile input.
  window.Gifting = {
    GiftClient: GiftClient,
    avatar: avatar,
    toast: toast,
    decodeJwt: decodeJwt,
    newKey: newKey,
    safeImageUrl: safeImageUrl,
    displayName: displayName,
    makeCatalog: makeCatalog,
    showBubble: showBubble,
    renderTop: renderTop,
    renderLive: renderLive,
    showSale: showSale,
    playEffect: playEffect,
    renderPinned: renderPinned,
    progressBar: progressBar,
  };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
