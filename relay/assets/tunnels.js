// #/tunnels: connected tunnels and names held while their client is offline.
import { get } from './api.js';
import { h, replace, fmtUnix, fmtAgo, clearError, every } from './dom.js';

const POLL_MS = 3000;

export async function render(ctx) {
  ctx.title('Tunnels');
  const body = h('tbody');
  const empty = h('p', { class: 'muted', hidden: true, text: 'No tunnels yet. Run `ferry http 3000` against this relay to open one.' });
  replace(ctx.main,
    h('div', { class: 'page-head' }, h('h1', { text: 'Tunnels' }), h('span', { class: 'muted', text: `updated every ${POLL_MS / 1000} s` })),
    h('div', { class: 'table-wrap' },
      h('table', { id: 'tunnels', class: 'grid' },
        h('thead', {}, h('tr', {},
          ['Name', 'Public URL', 'Target', 'State', 'Requests', 'Last request'].map((t) => h('th', { scope: 'col', text: t })))),
        body)),
    empty);

  let first = true;
  let failing = false;
  await every(POLL_MS, async () => {
    try {
      const list = await get('/tunnels', ctx.signal);
      const rows = [
        ...list.tunnels.map((t) => h('tr', { dataset: { name: t.name } },
          h('td', {}, h('a', { href: `#/log?tunnel=${encodeURIComponent(t.name)}`, text: t.name, title: 'Its activity log' })),
          h('td', {}, h('a', { href: t.public_url, target: '_blank', rel: 'noopener noreferrer', text: t.public_url })),
          h('td', { class: 'mono', text: t.target || '—' }),
          h('td', {}, h('span', { class: 'pill ok', text: 'connected' }), ' since ', h('span', { title: fmtUnix(t.connected_at), text: fmtAgo(t.connected_at) })),
          h('td', { class: 'num', text: t.requests ?? '—' }),
          h('td', { title: fmtUnix(t.last_request_at), text: t.last_request_at ? fmtAgo(t.last_request_at) : '—' }))),
        ...(list.offline || []).map((t) => h('tr', { dataset: { name: t.name }, class: 'offline' },
          h('td', {}, h('a', { href: `#/log?tunnel=${encodeURIComponent(t.name)}`, text: t.name })),
          h('td', { class: 'muted', text: t.held_until ? `held until ${fmtUnix(t.held_until)}` : '—' }),
          h('td', { class: 'mono', text: t.target || '—' }),
          h('td', {}, h('span', { class: 'pill warn', text: 'offline' }), ' since ', h('span', { title: fmtUnix(t.last_seen), text: fmtAgo(t.last_seen) })),
          h('td', { class: 'num', text: '—' }),
          h('td', { text: '—' }))),
      ];
      replace(body, rows);
      empty.hidden = rows.length > 0;
      if (first) ctx.ready();
      if (failing) clearError();
      first = failing = false;
    } catch (err) {
      failing = true;
      ctx.fail(err); // keeps polling: a relay restart heals by itself
    }
  }, ctx.signal);
}
