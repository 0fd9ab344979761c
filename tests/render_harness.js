/* Runs the demo pages' app.js under Node with a minimal fake DOM (tests/test_pages.py).
 *
 * Usage: node render_harness.js APP_JS < input.json > output.json
 * input: {urls: [...], bubbles: [...], top: [...], title, me: {user, name, avatar}, gifts: [...],
 *         sales: [...], effects: [...] (`sale` and `effect` events), effect_list: [...],
 *         pinned: product | null}
 * output: {urls: {url: safe-or-null}, tree: {...}, images: [src...], html: [what tried HTML]}
 *
 * The fake DOM has no HTML parser: setting innerHTML/outerHTML or calling
 * insertAdjacentHTML/document.write is recorded (and throws), so any user data
 * that reaches the page other than as text shows up in `html`.
 */
'use strict';
const fs = require('fs');
const vm = require('vm');

const html = [];
const images = [];

class Node_ {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.children = [];
    this.text = '';
    this.parent = null;
    this.className = '';
    this.id = '';
    this.hidden = false;
    this.attrs = {};
    this.style = {
      setProperty(k, v) {
        this[k] = String(v);
      },
    };
    this.dataset = {};
    const cls = new Set();
    this.classList = { add: (c) => cls.add(c), remove: (c) => cls.delete(c), contains: (c) => cls.has(c) };
  }
  get textContent() {
    return this.text + this.children.map((c) => c.textContent).join('');
  }
  set textContent(v) {
    for (const c of this.children) c.parent = null;
    this.children = [];
    this.text = String(v);
  }
  set innerHTML(v) {
    html.push(String(v));
    throw new Error('innerHTML set: ' + v);
  }
  get innerHTML() {
    throw new Error('innerHTML read');
  }
  set outerHTML(v) {
    html.push(String(v));
    throw new Error('outerHTML set');
  }
  insertAdjacentHTML(_pos, v) {
    html.push(String(v));
    throw new Error('insertAdjacentHTML');
  }
  _adopt(n) {
    if (typeof n === 'string') {
      const t = new Node_('#text');
      t.text = n;
      n = t;
    }
    if (n.parent) n.remove();
    n.parent = this;
    return n;
  }
  append(...ns) {
    for (const n of ns) this.children.push(this._adopt(n));
  }
  prepend(...ns) {
    this.children.unshift(...ns.map((n) => this._adopt(n)));
  }
  insertBefore(n, ref) {
    const i = ref ? this.children.indexOf(ref) : -1;
    const a = this._adopt(n);
    if (i < 0) this.children.push(a);
    else this.children.splice(i, 0, a);
  }
  remove() {
    if (!this.parent) return;
    const sib = this.parent.children;
    sib.splice(sib.indexOf(this), 1);
    this.parent = null;
  }
  get parentNode() {
    return this.parent;
  }
  get firstElementChild() {
    return this.children[0] || null;
  }
  get lastElementChild() {
    return this.children[this.children.length - 1] || null;
  }
  get childElementCount() {
    return this.children.length;
  }
  setAttribute(k, v) {
    if (/^on/i.test(k)) html.push(k + '=' + v);
    this.attrs[k] = String(v);
  }
  getAttribute(k) {
    return k in this.attrs ? this.attrs[k] : null;
  }
  addEventListener() {}
  querySelector(sel) {
    const find = (n) => {
      for (const c of n.children) {
        if ((sel[0] === '#' && c.id === sel.slice(1)) ||
            (sel[0] === '.' && c.className.split(' ').includes(sel.slice(1)))) return c;
        const r = find(c);
        if (r) return r;
      }
      return null;
    };
    return find(this);
  }
  querySelectorAll() {
    return [];
  }
  toJSON() {
    const o = { tag: this.tagName, text: this.text, cls: this.className, id: this.id };
    if (this.tagName === 'IMG') o.src = this.src;
    if (this.children.length) o.children = this.children.map((c) => c.toJSON());
    return o;
  }
}

class Image_ extends Node_ {
  constructor() {
    super('img');
    this._src = '';
  }
  set src(v) {
    this._src = String(v);
    images.push(this._src);
    // A picture that loads replaces the initial, as in a browser.
    if (typeof this.onload === 'function') this.onload();
  }
  get src() {
    return this._src;
  }
}

const body = new Node_('body');
body.dataset.page = 'test'; // no page controller starts
for (const id of ['me', 'bubbles', 'top', 'room-subtitle', 'live-badge', 'toasts', 'pinned']) {
  const n = new Node_('div');
  n.id = id;
  body.append(n);
}
const document = {
  body: body,
  readyState: 'complete',
  title: '',
  createElement: (tag) => (tag.toLowerCase() === 'img' ? new Image_() : new Node_(tag)),
  querySelector: (sel) => body.querySelector(sel),
  querySelectorAll: () => [],
  addEventListener() {},
  write: (v) => {
    html.push(String(v));
    throw new Error('document.write');
  },
};

const ctx = {
  document: document,
  Image: Image_,
  URL: URL,
  URLSearchParams: URLSearchParams,
  TextDecoder: TextDecoder,
  atob: atob,
  console: console,
  setTimeout: () => 0,
  clearTimeout: () => {},
  location: { href: 'https://hub.example/viewer.html', search: '', protocol: 'https:', host: 'hub.example' },
  crypto: globalThis.crypto,
};
ctx.window = ctx;
ctx.window.addEventListener = () => {};
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(process.argv[2], 'utf8'), ctx, { filename: 'app.js' });
const G = ctx.Gifting;

const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const out = { urls: {}, errors: [] };
const run = (what, fn) => {
  try {
    fn();
  } catch (e) {
    out.errors.push(what + ': ' + e.message);
  }
};
for (const u of input.urls) out.urls[u] = G.safeImageUrl(u);
const catalog = G.makeCatalog();
catalog.set(input.gifts);
for (const b of input.bubbles) run('bubble', () => G.showBubble(b, catalog));
run('top', () => G.renderTop(input.top));
run('live', () => G.renderLive(true, input.title));
run('me', () => document.querySelector('#me').append(G.avatar(input.me, 26)));
// "Bought" bubbles get a lane of their own (a lane keeps its newest 8), next to the gifts'.
const gifts = document.querySelector('#bubbles');
gifts.id = 'gift-bubbles';
const sales = new Node_('div');
sales.id = 'bubbles';
body.append(sales);
for (const ev of input.sales || []) run('sale', () => G.showSale(ev));
const effects = G.makeCatalog();
effects.set(input.effect_list || []);
// Each effect in a layer of its own (a layer plays the newest 3 at once).
(input.effects || []).forEach((ev, i) => {
  run('effect', () => G.playEffect(ev, effects));
  const layer = document.querySelector('#fx');
  if (layer) layer.id = 'fx-' + i;
});
if (input.pinned !== undefined) run('pinned', () => G.renderPinned(input.pinned, () => {}, false));
out.tree = body.toJSON();
out.images = images;
out.html = html;
process.stdout.write(JSON.stringify(out));
