// nanosae feature dashboard. Every node is built with createElement/textContent, never from HTML strings:
// token strings and labels are data, shown as text whatever characters they hold.
'use strict';
(function () {
  const app = document.getElementById('app');
  const tip = document.getElementById('tip');
  const IDX = window.NANOSAE_INDEX;
  if (!IDX) {
    app.replaceChildren(el('p', { text: 'data/index.js is missing: rerun `nanosae viz`.' }));
    return;
  }
  const VOCAB = window.NANOSAE_VOCAB || [];
  const LABELS = window.NANOSAE_LABELS || {};
  const META = IDX.meta;
  const N = META.d_sae;
  const SPECIAL = new Set(META.special_ids);
  const PAGE = 50;
  const SVG = 'http://www.w3.org/2000/svg';

  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'text') e.textContent = v;
      else if (k === 'cls') e.className = v;
      else if (k === 'on') for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
      else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid); // strings become text nodes
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }

  function fmt(x) {
    if (x === 0) return '0';
    const a = Math.abs(x);
    return a >= 1e5 || a < 1e-3 ? x.toExponential(2) : String(Number(x.toPrecision(4)));
  }

  function pct(d) {
    if (d === 0) return '0%';
    const p = d * 100;
    return (p < 0.001 ? p.toExponential(2) : String(Number(p.toPrecision(3)))) + '%';
  }

  // whitespace made visible: newlines, tabs and returns always; spaces in a token made only of whitespace, or
  // in a token shown on its own (tables), where a leading space would otherwise be invisible
  function visible(s, alone) {
    if (s === '') return '∅';
    let t = s.replace(/\r/g, '␍').replace(/\n/g, '↵').replace(/\t/g, '⇥');
    if (alone || /^\s+$/.test(s)) t = t.replace(/ /g, '␣');
    return t;
  }

  function tokText(id) {
    return id >= 0 && id < VOCAB.length ? VOCAB[id] : '?';
  }

  function tokSpan(id, cls, alone) {
    const s = tokText(id);
    const span = el('span', { cls: cls, text: visible(s, alone) });
    if (/^\s*$/.test(s) || /[\r\n\t]/.test(s)) span.classList.add('ws');
    if (SPECIAL.has(id)) span.classList.add('special');
    return span;
  }

  function labelOf(i) {
    return Object.prototype.hasOwnProperty.call(LABELS, String(i)) ? LABELS[String(i)] : '';
  }

  // ----------------------------------------------------------------------------------------------- index

  const state = { q: '', sort: 'density', dir: 'desc', page: 0 };
  let searchText = null; // per latent: lowercased label and top tokens, built on the first search

  function matches(i, q) {
    const id = /^#?(\d+)$/.exec(q);
    if (id) return i === Number(id[1]);
    if (!searchText) {
      searchText = [];
      for (let j = 0; j < N; j++) {
        searchText.push([labelOf(j).toLowerCase()].concat(IDX.top[j].map((t) => tokText(t).toLowerCase())));
      }
    }
    const ql = q.toLowerCase();
    return searchText[i].some((s) => s.includes(ql));
  }

  function ordered() {
    const key = { density: IDX.density, max: IDX.max, mean: IDX.mean }[state.sort];
    const q = state.q.trim();
    let ids = Array.from({ length: N }, (_, i) => i);
    if (q) ids = ids.filter((i) => matches(i, q));
    const sign = state.dir === 'asc' ? 1 : -1;
    if (key) ids.sort((a, b) => sign * (key[a] - key[b]) || a - b);
    else if (sign < 0) ids.reverse();
    return ids;
  }

  function saveState() {
    const p = new URLSearchParams({ sort: state.sort, dir: state.dir, page: String(state.page) });
    if (state.q) p.set('q', state.q);
    history.replaceState(null, '', '#/?' + p.toString());
  }

  const COLUMNS = [
    ['id', 'Latent'],
    [null, 'Label'],
    ['density', 'Density'],
    ['max', 'Max act.'],
    ['mean', 'Mean act.'],
    [null, 'Top tokens'],
  ];

  function showIndex(params) {
    state.q = params.get('q') || '';
    state.sort = ['id', 'density', 'max', 'mean'].includes(params.get('sort')) ? params.get('sort') : 'density';
    state.dir = params.get('dir') === 'asc' ? 'asc' : 'desc';
    state.page = Math.max(0, parseInt(params.get('page') || '0', 10) || 0);
    document.title = 'nanosae · ' + META.model_name + ' · ' + META.site;
    const search = el('input', {
      id: 'search',
      type: 'search',
      placeholder: 'search token text, label, or #id',
      on: { input: () => { state.q = search.value; state.page = 0; render(); } },
    });
    search.value = state.q;
    const sort = el('select', {
      id: 'sort',
      on: { change: () => { state.sort = sort.value; state.dir = sort.value === 'id' ? 'asc' : 'desc'; state.page = 0; render(); } },
    });
    for (const [v, name] of [['density', 'density'], ['max', 'max activation'], ['mean', 'mean activation'], ['id', 'id']]) {
      sort.append(el('option', { value: v, text: 'sort by ' + name }));
    }
    const dir = el('button', {
      id: 'dir',
      type: 'button',
      on: { click: () => { state.dir = state.dir === 'asc' ? 'desc' : 'asc'; render(); } },
    });
    const prev = el('button', { id: 'prev', type: 'button', text: '‹ prev', on: { click: () => { state.page--; render(); } } });
    const next = el('button', { id: 'next', type: 'button', text: 'next ›', on: { click: () => { state.page++; render(); } } });
    const count = el('span', { id: 'count' });
    const head = el('tr');
    for (const [key, name] of COLUMNS) {
      const th = el('th', { text: name });
      if (key) {
        th.classList.add('sortable');
        th.dataset.sort = key;
        th.addEventListener('click', () => {
          if (state.sort === key) state.dir = state.dir === 'asc' ? 'desc' : 'asc';
          else { state.sort = key; state.dir = key === 'id' ? 'asc' : 'desc'; }
          state.page = 0;
          render();
        });
      }
      head.append(th);
    }
    const body = el('tbody');
    const table = el('table', { id: 'latents' }, el('thead', null, head), body);

    function render() {
      const ids = ordered();
      const pages = Math.max(1, Math.ceil(ids.length / PAGE));
      state.page = Math.min(Math.max(0, state.page), pages - 1);
      sort.value = state.sort;
      dir.textContent = state.dir === 'asc' ? '↑ ascending' : '↓ descending';
      for (const th of head.children) th.classList.toggle('sorted', th.dataset.sort === state.sort);
      const start = state.page * PAGE;
      const shown = ids.slice(start, start + PAGE);
      count.textContent = ids.length
        ? `${start + 1}–${start + shown.length} of ${ids.length} latents (page ${state.page + 1} of ${pages})`
        : 'no latent matches';
      prev.disabled = state.page === 0;
      next.disabled = state.page >= pages - 1;
      body.replaceChildren(...shown.map(row));
      saveState();
    }

    function row(i) {
      const tops = el('td');
      for (const t of IDX.top[i].slice(0, 3)) tops.append(tokSpan(t, 'tok', true));
      return el(
        'tr',
        { cls: 'row', 'data-id': String(i), on: { click: () => { location.hash = '#/f/' + i; } } },
        el('td', null, el('a', { href: '#/f/' + i, text: String(i) })),
        el('td', { cls: 'label', text: labelOf(i) }),
        el('td', { cls: 'num', text: pct(IDX.density[i]) }),
        el('td', { cls: 'num', text: fmt(IDX.max[i]) }),
        el('td', { cls: 'num', text: fmt(IDX.mean[i]) }),
        tops,
      );
    }

    app.replaceChildren(el('div', { cls: 'controls' }, search, sort, dir, prev, next, count), table);
    render();
  }

  // ----------------------------------------------------------------------------------------------- a latent

  const waiting = {};
  let current = -1;

  function loadChunk(c, done) {
    const have = (window.NANOSAE_CHUNKS || {})[c];
    if (have) return done(have);
    if (waiting[c]) return waiting[c].push(done);
    waiting[c] = [done];
    const s = el('script', { src: 'data/chunk-' + c + '.js' });
    s.onload = () => {
      const fs = waiting[c];
      delete waiting[c];
      for (const f of fs) f((window.NANOSAE_CHUNKS || {})[c]);
    };
    s.onerror = () => {
      delete waiting[c];
      app.replaceChildren(el('p', { text: 'data/chunk-' + c + '.js is missing: rerun `nanosae viz`.' }));
    };
    document.head.append(s);
  }

  function showFeature(i) {
    current = i;
    if (i >= N) {
      app.replaceChildren(el('p', { text: `There is no latent ${i}; this SAE has latents 0 to ${N - 1}.` }), el('a', { href: '#/', text: '← all latents' }));
      return;
    }
    app.replaceChildren(el('p', { text: 'Loading latent ' + i + '…' }));
    loadChunk(Math.floor(i / META.chunk), (recs) => {
      if (current === i) renderFeature(recs[i % META.chunk]);
    });
  }

  function histogram(heights, lo, hi, cls) {
    const W = 320, H = 80, n = heights.length;
    const top = Math.max(1, ...heights);
    const s = svg('svg', { class: 'hist ' + cls, width: W, height: H + 14, viewBox: `0 0 ${W} ${H + 14}` });
    heights.forEach((h, k) => {
      const bh = (h / top) * H;
      const r = svg('rect', { x: (k * W) / n, y: H - bh, width: Math.max(1, W / n - 1), height: bh });
      const t = svg('title');
      t.textContent = `${fmt(lo + (k * (hi - lo)) / n)} to ${fmt(lo + ((k + 1) * (hi - lo)) / n)}: ${h}`;
      r.append(t);
      s.append(r);
    });
    const left = svg('text', { x: 0, y: H + 12 });
    left.textContent = fmt(lo);
    const right = svg('text', { x: W, y: H + 12, 'text-anchor': 'end' });
    right.textContent = fmt(hi);
    s.append(left, right);
    return s;
  }

  function table(id, headers, rows) {
    return el(
      'table',
      { id: id },
      el('thead', null, el('tr', null, ...headers.map((h) => el('th', { text: h })))),
      el('tbody', null, ...rows.map((r) => el('tr', null, ...r.map((c) => (c instanceof Node ? el('td', null, c) : el('td', { cls: 'num', text: c })))))),
    );
  }

  function panel(title, ...body) {
    return el('div', { cls: 'panel' }, el('h3', { text: title }), ...body);
  }

  function latentLink(j) {
    const a = el('a', { href: '#/f/' + j, text: String(j) });
    const lab = labelOf(j);
    const span = el('span', null, a);
    if (lab) span.append(' ', el('span', { cls: 'label', text: lab }));
    for (const t of IDX.top[j].slice(0, 2)) span.append(' ', tokSpan(t, 'tok', true));
    return span;
  }

  function exampleRow(ex, fmax) {
    const [toks, vals, q] = ex;
    const row = el('div', { cls: 'ex' }, el('span', { cls: 'val', text: fmt(vals[q]) }));
    toks.forEach((t, k) => {
      const span = tokSpan(t, 't', false);
      const v = vals[k];
      if (v > 0) span.style.backgroundColor = `rgba(255, 120, 0, ${(0.08 + 0.82 * Math.min(1, v / (fmax || 1))).toFixed(3)})`;
      span.title = fmt(v);
      span.dataset.value = fmt(v);
      if (k === q) span.classList.add('q');
      row.append(span);
    });
    return row;
  }

  function renderFeature(f) {
    const i = f.i;
    document.title = 'latent ' + i + ' · nanosae';
    const nav = el(
      'div',
      { cls: 'nav' },
      el('a', { href: '#/', text: '← all latents' }),
      i > 0 ? el('a', { id: 'prevlatent', href: '#/f/' + (i - 1), text: '‹ ' + (i - 1) }) : null,
      i < N - 1 ? el('a', { id: 'nextlatent', href: '#/f/' + (i + 1), text: i + 1 + ' ›' }) : null,
    );
    const out = [nav, el('h1', { id: 'title', text: 'Latent ' + i })];
    if (labelOf(i)) out.push(el('p', { id: 'label', cls: 'label', text: labelOf(i) }));
    out.push(el('p', { id: 'stats', cls: 'stats', text: `density ${pct(f.density)} · max ${fmt(f.max)} · mean ${fmt(f.mean)} when active` }));
    const lr = f.logit_range;
    out.push(
      el(
        'div',
        { cls: 'grid' },
        panel('Activations · density = ' + pct(f.density), histogram(f.act_hist, 0, f.max, 'acts')),
        panel('Logit weights (decoder · unembedding)', histogram(f.logit_hist, lr[0], lr[1], 'logits')),
        panel('Promoted tokens', table('pos', ['token', 'logit'], f.pos.map(([t, v]) => [tokSpan(t, 'tok', true), fmt(v)]))),
        panel('Suppressed tokens', table('neg', ['token', 'logit'], f.neg.map(([t, v]) => [tokSpan(t, 'tok', true), fmt(v)]))),
        panel('Nearest latents (decoder cosine)', table('neighbours', ['latent', 'cosine'], f.neighbours.map(([j, c]) => [latentLink(j), fmt(c)]))),
        panel(
          'Decoder alignment',
          table('alignment', ['dim', 'weight', '% of L1'], f.alignment.map(([d, v, l1]) => [String(d), fmt(v), pct(l1)])),
          table('corrneurons', ['input dim', 'pearson', 'cosine'], f.corr_neurons.map(([d, p, c]) => [String(d), fmt(p), fmt(c)])),
          table('corrfeatures', ['latent', 'pearson', 'cosine'], f.corr_features.map(([j, p, c]) => [latentLink(j), fmt(p), fmt(c)])),
        ),
      ),
    );
    out.push(el('h2', { text: 'Top activations' }));
    const top = el('div', { id: 'top', cls: 'examples' });
    if (f.top.length) top.append(...f.top.map((ex) => exampleRow(ex, f.max)));
    else top.append(el('p', { cls: 'muted', text: `Never active on the ${META.n_tokens} tokens seen.` }));
    out.push(top);
    f.intervals.forEach((iv, m) => {
      out.push(el('h2', { text: `Interval ${fmt(iv.min)} to ${fmt(iv.max)} · contains ${pct(iv.contains)} of tokens` }));
      const box = el('div', { id: 'interval-' + m, cls: 'examples' });
      if (iv.examples.length) box.append(...iv.examples.map((ex) => exampleRow(ex, f.max)));
      else box.append(el('p', { cls: 'muted', text: 'no activation in this interval' }));
      out.push(box);
    });
    app.replaceChildren(...out);
    window.scrollTo(0, 0);
  }

  // hover readout: token and value next to the pointer (the title attribute holds the value too)
  app.addEventListener('mouseover', (e) => {
    const t = e.target.closest && e.target.closest('span.t');
    if (!t) return;
    tip.textContent = t.textContent + '  ' + t.dataset.value;
    tip.hidden = false;
  });
  app.addEventListener('mousemove', (e) => {
    tip.style.left = e.clientX + 12 + 'px';
    tip.style.top = e.clientY + 12 + 'px';
  });
  app.addEventListener('mouseout', (e) => {
    if (e.target.closest && e.target.closest('span.t')) tip.hidden = true;
  });

  function route() {
    const h = location.hash.slice(1) || '/';
    const [path, query] = h.split('?');
    const m = /^\/?(?:f\/)?(\d+)$/.exec(path); // #/f/123, or #123 as other pages link
    tip.hidden = true;
    if (m) showFeature(Number(m[1]));
    else {
      current = -1;
      showIndex(new URLSearchParams(query || ''));
    }
  }

  document.getElementById('subtitle').textContent =
    `${META.model_name} · ${META.site} · ${N} latents (${META.architecture}) · ${META.n_tokens} tokens of ${META.dataset}`;
  for (const page of window.NANOSAE_PAGES || []) {  // pages that link themselves here (nanosae evolve --dashboard)
    document.querySelector('header').append(' · ', el('a', { href: page.href, text: page.title }));
  }
  window.addEventListener('hashchange', route);
  route();
})();
