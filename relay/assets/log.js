// #/log: the activity log, newest first, fed live by the server-sent events
// stream and paged backwards by cursor as the reader scrolls.
import { get, probe, query } from './api.js';
import { h, replace, timeEl, fmtMs, fmtSize, statusEl, clearError } from './dom.js';

const PAGE = 50;
// Rows kept on the page: a busy relay streams thousands a second, and a
// table that grows without end freezes the tab. Older ones page in again.
const MAX_ROWS = 1000;
const RETRY_MS = 5000;
const FILTERS = ['tunnel', 'kind', 'method', 'status', 'q'];
const EMPTY = 'No requests match yet. They appear here as they arrive.';

function select(id, options, value) {
  return h('select', { id, name: id.slice(2), value },
    options.map(([v, label]) => h('option', { value: v, text: label })));
}

export async function render(ctx) {
  ctx.title('Activity log');
  const filters = Object.fromEntries(FILTERS.map((k) => [k, ctx.query.get(k) || '']));

  const fields = {
    tunnel: h('input', { id: 'f-tunnel', name: 'tunnel', list: 'tunnel-names', placeholder: 'any', autocomplete: 'off', value: filters.tunnel }),
    kind: select('f-kind', [['', 'any'], ['tunnel', 'tunnel'], ['replay', 'replay'], ['dispatch', 'dispatch']], filters.kind),
    method: select('f-method', [['', 'any'], ...['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS'].map((m) => [m, m])], filters.method.toUpperCase()),
    status: h('input', { id: 'f-status', name: 'status', placeholder: '200 or 4xx', size: 8, value: filters.status }),
    q: h('input', { id: 'f-q', name: 'q', type: 'search', placeholder: 'path, headers, body…', value: filters.q }),
  };
  const names = h('datalist', { id: 'tunnel-names' });
  const hint = h('span', { class: 'hint', 'aria-live': 'polite' });
  const live = h('span', { id: 'live', class: 'pill', text: 'connecting' });
  const label = (id, text, el) => h('div', { class: 'field' }, h('label', { for: id, text }), el);
  const form = h('form', { class: 'filters', role: 'search' },
    label('f-tunnel', 'Tunnel', fields.tunnel), names,
    label('f-kind', 'Kind', fields.kind),
    label('f-method', 'Method', fields.method),
    label('f-status', 'Status', fields.status),
    label('f-q', 'Search', fields.q),
    hint);
  const tbody = h('tbody');
  const empty = h('p', { class: 'muted empty', text: EMPTY, hidden: true });
  const more = h('button', { type: 'button', class: 'secondary', text: 'Load older', hidden: true });
  const end = h('span', { class: 'muted', text: 'No older entries.', hidden: true });
  replace(ctx.main,
    h('div', { class: 'page-head' }, h('h1', { text: 'Activity log' }), live),
    form,
    h('div', { class: 'table-wrap' },
      h('table', { id: 'log', class: 'grid log' },
        h('thead', {}, h('tr', {},
          ['Time', 'Tunnel', 'Kind', 'Method', 'Path', 'Status', 'Duration', 'Size'].map((t) => h('th', { scope: 'col', text: t })))),
        tbody)),
    empty,
    h('div', { class: 'more' }, more, end));

  get('/tunnels', ctx.signal).then((list) => {
    replace(names, [...list.tunnels, ...(list.offline || [])].map((t) => h('option', { value: t.name })));
  }, () => {});

  // Clicking anywhere in a row opens it; the path link is the keyboard way.
  tbody.addEventListener('click', (event) => {
    const tr = event.target.closest('tr[data-id]');
    if (!tr || event.target.closest('a') || getSelection().toString()) return;
    window.location.hash = `#/requests/${encodeURIComponent(tr.dataset.id)}`;
  });

  let feed = null; // aborts this filter's stream and paging
  let cursor = null;
  let loading = null; // the signal of the feed whose page is loading
  let firstPage = true;

  const rowFor = (item) => {
    const kind = item.dispatch ? `dispatch #${item.dispatch.attempt}` : item.kind;
    const href = `#/requests/${encodeURIComponent(item.id)}`;
    return h('tr', { dataset: { id: item.id } },
      h('td', { class: 'nowrap' }, timeEl(item.received_at)),
      h('td', { text: item.tunnel || '—' }),
      h('td', {}, h('span', { class: `pill kind-${item.kind}`, text: kind })),
      h('td', { class: 'mono', text: item.method }),
      h('td', { class: 'path' }, h('a', { href, class: 'mono', title: item.path, text: item.path })),
      h('td', {}, statusEl(item.status), item.outcome !== 'answered' ? h('span', { class: 'outcome', text: ` ${item.outcome.replaceAll('_', ' ')}` }) : null),
      h('td', { class: 'num', text: fmtMs(item.duration_ms) }),
      h('td', { class: 'num nowrap', title: 'request / response', text: `${fmtSize(item.request_size)} / ${fmtSize(item.response_size)}` }));
  };

  // Ids sort by time, so each row goes where its id says: live rows, a
  // backfill after a reconnect and older pages can arrive in any order.
  const insert = (item, fresh) => {
    if (tbody.querySelector(`tr[data-id="${CSS.escape(item.id)}"]`)) return;
    const tr = rowFor(item);
    if (fresh) tr.classList.add('fresh');
    let next = fresh ? tbody.firstElementChild : null;
    if (fresh) {
      while (next && next.dataset.id > item.id) next = next.nextElementSibling;
    } else {
      let prev = tbody.lastElementChild;
      while (prev && prev.dataset.id < item.id) prev = prev.previousElementSibling;
      next = prev ? prev.nextElementSibling : tbody.firstElementChild;
    }
    tbody.insertBefore(tr, next);
  };

  const trim = () => {
    let extra = tbody.children.length - MAX_ROWS;
    if (extra <= 0) return;
    while (extra-- > 0) tbody.lastElementChild.remove();
    cursor = tbody.lastElementChild.dataset.id; // a cursor is the last id seen
    end.hidden = true;
    more.hidden = false;
  };

  const showState = () => {
    empty.hidden = tbody.children.length > 0;
    more.hidden = !cursor;
    end.hidden = !!cursor || tbody.children.length === 0;
  };

  const loadPage = async (signal) => {
    if (loading === signal) return;
    loading = signal;
    more.disabled = true;
    try {
      const page = await get(`/requests${query({ ...filters, limit: PAGE, cursor })}`, signal);
      if (signal.aborted) return;
      for (const item of page.items) insert(item, false);
      cursor = page.next_cursor;
      showState();
      if (firstPage) {
        // Ready once the feed is live too: a request sent from then on
        // shows without a reload.
        await streamOpen;
        ctx.ready();
      }
      firstPage = false;
    } finally {
      if (loading === signal) loading = null;
      more.disabled = false;
    }
    // A short page may leave the end in view, where the observer won't fire again.
    if (cursor && more.getBoundingClientRect().top < window.innerHeight + 200) loadPage(signal).catch(ctx.fail);
  };

  // Live rows are batched so a burst is one layout, not one per event.
  let queue = [];
  let flushTimer = 0;
  const flush = () => {
    flushTimer = 0;
    if (queue.length > MAX_ROWS) {
      // Too many to show: start over from the newest, page the rest in.
      queue = queue.slice(-MAX_ROWS);
      tbody.replaceChildren();
      cursor = queue[0].id;
    }
    for (const item of queue) insert(item, true);
    queue = [];
    trim();
    showState();
  };

  // Settles when the feed is open (or has failed, which is shown apart).
  let streamOpen = Promise.resolve();

  const openStream = (signal) => {
    const es = new EventSource(`/api/v1/requests/stream${query(filters)}`);
    streamOpen = new Promise((resolve) => {
      es.addEventListener('open', resolve, { once: true });
      es.addEventListener('error', resolve, { once: true });
    });
    signal.addEventListener('abort', () => es.close());
    let backfill = true;
    es.addEventListener('request', (event) => {
      queue.push(JSON.parse(event.data));
      if (!flushTimer) flushTimer = setTimeout(flush, 100);
    });
    es.addEventListener('open', () => {
      live.textContent = 'live';
      live.className = 'pill ok';
      // The browser resumes with Last-Event-ID by itself; a stream opened
      // anew starts at whatever was committed when the relay took it, which
      // may be after the page was read: fetch the newest again.
      if (backfill) {
        get(`/requests${query({ ...filters, limit: PAGE })}`, signal).then((page) => {
          page.items.forEach((item) => insert(item, true));
          trim();
          showState();
          clearError();
        }, ctx.fail);
        backfill = false;
      }
    });
    es.addEventListener('error', () => {
      if (signal.aborted) return;
      if (es.readyState === EventSource.CLOSED) {
        // Refused (401, 429 …): EventSource gives up; so do we, for a while.
        live.textContent = 'disconnected, retrying';
        live.className = 'pill bad';
        es.close();
        setTimeout(() => retry(signal), RETRY_MS);
      } else {
        live.textContent = 'reconnecting';
        live.className = 'pill warn';
      }
    });
  };

  // EventSource hides why it was refused; a fetch of the same URL shows
  // the status and the API's message (and a 401 brings up the sign-in form).
  const retry = async (signal) => {
    if (signal.aborted) return;
    try {
      await probe(`/requests/stream${query(filters)}`);
    } catch (err) {
      ctx.fail(err);
      setTimeout(() => retry(signal), RETRY_MS);
      return;
    }
    if (!signal.aborted) openStream(signal);
  };

  const start = async () => {
    if (feed) feed.abort();
    feed = new AbortController();
    const signal = feed.signal;
    tbody.replaceChildren();
    empty.textContent = EMPTY;
    cursor = null;
    queue = [];
    live.textContent = 'connecting';
    live.className = 'pill';
    // Stream first, then the page; the stream's backfill when it opens
    // covers what was committed in between, and insert() drops duplicates.
    openStream(signal);
    try {
      await loadPage(signal);
    } catch (err) {
      if (signal.aborted) return; // a newer filter took over
      feed.abort();
      empty.textContent = err.message; // in place of "no requests yet", which would be a lie
      empty.hidden = false;
      live.textContent = 'stopped';
      live.className = 'pill bad';
      throw err;
    }
  };

  const observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting) && cursor && !loading) loadPage(feed.signal).catch(ctx.fail);
  }, { rootMargin: '200px' });
  observer.observe(more);
  ctx.signal.addEventListener('abort', () => {
    observer.disconnect();
    clearTimeout(flushTimer);
    if (feed) feed.abort();
  });
  more.addEventListener('click', () => loadPage(feed.signal).catch(ctx.fail));

  let debounce = 0;
  const apply = () => {
    clearTimeout(debounce);
    const next = Object.fromEntries(FILTERS.map((k) => [k, fields[k].value.trim()]));
    const q = next.q.replace(/[%_]/g, '');
    if (next.q && q.length < 3) {
      hint.textContent = 'Search needs at least 3 characters.';
      return;
    }
    hint.textContent = '';
    if (FILTERS.every((k) => next[k] === filters[k])) return;
    Object.assign(filters, next);
    ctx.replaceHash(`#/log${query(filters)}`);
    clearError();
    start().catch(ctx.fail);
  };
  form.addEventListener('submit', (e) => { e.preventDefault(); apply(); });
  form.addEventListener('change', apply);
  form.addEventListener('input', (e) => {
    if (e.target.tagName !== 'INPUT') return;
    clearTimeout(debounce);
    debounce = setTimeout(apply, 400);
  });

  await start();
}
