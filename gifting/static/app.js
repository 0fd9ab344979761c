/* gifting demo pages: shared client code and the three page controllers.
 *
 * Plain JavaScript, no dependencies, no build step. Each HTML page loads this
 * file and names itself with <body data-page="index|viewer|creator">.
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
  };

  /** "Not enough coins: need 500 coins, have 12", or errText for other codes. */
  function friendlyError(e) {
    const code = isObj(e) ? str(e.code) : '';
    const head = Object.prototype.hasOwnProperty.call(FRIENDLY, code) ? FRIENDLY[code] : '';
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
    t.append(el('span', 'toast-icon', kind === 'info' ? 'i' : '!'), el('span', 'toast-text', message));
    box.append(t);
    while (box.children.length > 4) box.firstElementChild.remove();
    const ms = kind === 'info' ? 3000 : 5000;
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
    if (creator || viewer) $('#links').hidden = false;
    if (!creator || !viewer) $('#howto').hidden = false;
  }

  // ------------------------------------------------------------- viewer page

  function viewerPage() {
    const page = startPage();
    if (!page) return;
    const client = page.client;
    const catalog = makeCatalog();
    const st = { room: validRoom(page.params.get('room')), joined: null, live: false, count: 1 };
    const form = $('#room-form');
    const input = $('#room-input');

    function updateGiftButtons() {
      const enabled = st.joined !== null && st.joined === st.room && st.live;
      for (const b of document.querySelectorAll('#catalog button')) b.disabled = !enabled;
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

    function resetRoomView() {
      st.live = false;
      setText('#room-title', st.room || 'No room');
      setText('#room-subtitle', '');
      setText('#viewers', '—');
      renderLive(false);
      renderTop([]);
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
        renderLive(st.live, r.title);
        setText('#viewers', fmt(r.viewers));
        renderTop(r.top);
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
      const count = st.count;
      const key = newKey();
      if (!room) {
        toast('Join a room first');
        return;
      }
      for (let attempt = 0; attempt < 6; attempt++) {
        if (attempt > 0) await sleep(Math.min(8000, 400 * Math.pow(2, attempt)));
        try {
          await client.whenReady(15000);
          const r = await client.request('gift', { room: room, gift: g.id, count: count, key: key });
          setBalance(r.coins);
          if (r.duplicate === true) toast('That gift was already delivered', 'info');
          return;
        } catch (e) {
          if (!RETRYABLE.has(errCode(e))) {
            toast(friendlyError(e));
            return;
          }
        }
      }
      toast('Could not confirm the gift: check your balance before sending again');
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
      updateGiftButtons();
    });
    client.onOpen = () => {
      st.joined = null;
      loadCommon(client, catalog, renderCatalog);
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
        setText('#viewers', fmt(r.viewers));
        renderTop(r.top);
        renderState();
        client.setReady(true);
      } catch (e) {
        if (gen === client.gen) toast('Could not join your room: ' + errText(e));
      }
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
        toast('You are live', 'info');
      } catch (e) {
        toast('Go live: ' + friendlyError(e));
      }
    });

    $('#end-live').addEventListener('click', async () => {
      try {
        const r = await client.request('end_live');
        st.live = false;
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
      renderState();
    });
    client.on('gift', onGiftEvent);
    client.onOpen = onOpen;
    renderState();
    renderTop([]);
    client.connect();
  }

  // ---------------------------------------------------------------- startup

  const pages = { index: indexPage, viewer: viewerPage, creator: creatorPage };

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
  };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
