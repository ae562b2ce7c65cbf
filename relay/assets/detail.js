// #/requests/{id}: one exchange, request beside response, with replay.
import { api, get, enc } from './api.js';
import { h, replace, timeEl, fmtMs, fmtSize, statusEl, notify } from './dom.js';
import { bodyView } from './body.js';

const METHODS = ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS'];

function headersTable(headers) {
  if (!headers.length) return h('p', { class: 'muted', text: 'No headers.' });
  return h('table', { class: 'headers' },
    h('tbody', {}, headers.map((f) => h('tr', {},
      h('th', { scope: 'row', class: 'mono', text: f.name }),
      h('td', { class: 'mono' }, f.value, f.value_base64 ? h('span', { class: 'muted', title: `exact bytes (base64): ${f.value_base64}`, text: ' (not UTF-8)' }) : null)))));
}

function meta(pairs) {
  return h('dl', { class: 'meta' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', { text: k }), h('dd', {}, v)]));
}

function delta(from, to) {
  if (!from || !to) return '';
  return ` (+${fmtMs(Math.max(0, Date.parse(to) - Date.parse(from)))})`;
}

export async function render(ctx) {
  const [id] = ctx.params;
  const d = await get(`/requests/${enc(id)}`, ctx.signal);
  const base = `/api/v1/requests/${enc(id)}`;
  ctx.title(`${d.method} ${d.path}`);

  const replay = async (edits, button) => {
    button.disabled = true;
    try {
      const answer = await api('POST', `/requests/${enc(id)}/replay`, edits);
      notify(`Replayed: ${answer.status ?? answer.outcome}${answer.error ? ` (${answer.error})` : ''}`);
      window.location.hash = `#/requests/${enc(answer.id)}`;
    } catch (err) {
      ctx.fail(err);
    } finally {
      button.disabled = false;
    }
  };

  const curlBox = h('div', { class: 'curl', hidden: true });
  const copyCurl = async (event) => {
    const button = event.currentTarget;
    button.disabled = true;
    try {
      const command = String(await get(`/requests/${enc(id)}/curl`)).trim();
      const area = h('textarea', { id: 'curl-text', readonly: true, rows: 4, value: command, 'aria-label': 'curl command' });
      let copied = false;
      try {
        await navigator.clipboard.writeText(command);
        copied = true;
      } catch {
        // no clipboard (plain http on another host, denied): the box below
      }
      replace(curlBox, h('p', { class: 'muted', text: copied ? 'Copied to the clipboard:' : 'Copy this command (the clipboard is not available here):' }), area);
      curlBox.hidden = false;
      if (copied) notify('curl command copied');
      else area.select();
    } catch (err) {
      ctx.fail(err);
    } finally {
      button.disabled = false;
    }
  };

  const editForm = h('form', { class: 'panel edit', hidden: true });
  const replayButton = h('button', { type: 'button', id: 'replay', text: 'Replay', title: 'Send it again, as is, through its tunnel or to its webhook URL' });
  replayButton.addEventListener('click', () => replay({}, replayButton));
  const editButton = h('button', {
    type: 'button', id: 'edit-replay', class: 'secondary', text: 'Edit & replay', 'aria-expanded': 'false',
    onclick: () => {
      if (editForm.hidden) fillEditForm(editForm, d, replay);
      editForm.hidden = !editForm.hidden;
      editButton.setAttribute('aria-expanded', String(!editForm.hidden));
      if (!editForm.hidden) editForm.querySelector('#edit-method').focus();
    },
  });

  const problems = [];
  if (d.error) problems.push(d.error);
  if (d.outcome !== 'answered') problems.push(`Outcome: ${d.outcome.replaceAll('_', ' ')}.`);
  if (d.incomplete) problems.push('Part of this capture was lost (the capture queue was full); what is shown is exact.');

  const res = d.response;
  replace(ctx.main,
    h('div', { class: 'page-head' },
      h('h1', { class: 'mono wrap' }, `${d.method} ${d.path} `, statusEl(d.status)),
      h('a', { href: '#/log', text: '← Activity log' })),
    meta([
      ['Received', timeEl(d.received_at)],
      ['Tunnel', d.tunnel ? h('a', { href: `#/log?tunnel=${enc(d.tunnel)}`, text: d.tunnel }) : '—'],
      ['Kind', d.kind],
      ['Duration', fmtMs(d.duration_ms)],
      ['From', h('span', { class: 'mono', text: d.remote_addr || '—' })],
      d.replay_of && ['Replay of', h('a', { id: 'replay-of', href: `#/requests/${enc(d.replay_of)}`, class: 'mono', text: d.replay_of })],
      d.replayed_at && ['Replayed by the client', timeEl(d.replayed_at)],
      d.dispatch && ['Webhook', h('a', { id: 'dispatch-webhook', href: `#/webhooks/${enc(d.dispatch.webhook_id)}`, class: 'mono', text: d.dispatch.webhook_id })],
      d.dispatch && ['Delivery', h('span', {},
        h('a', { id: 'dispatch-delivery', href: `#/deliveries/${enc(d.dispatch.delivery_id)}`, class: 'mono', text: d.dispatch.delivery_id }),
        ` attempt ${d.dispatch.attempt}, event `, h('span', { class: 'mono', text: d.dispatch.event_id }))],
    ]),
    problems.length ? h('div', { class: 'panel error-panel', id: 'outcome', role: 'note' }, problems.map((p) => h('p', { text: p }))) : null,
    h('div', { class: 'actions' },
      replayButton,
      editButton,
      h('button', { type: 'button', id: 'copy-curl', class: 'secondary', text: 'Copy as curl', onclick: copyCurl }),
      h('a', { id: 'har', class: 'button secondary', href: `${base}/har`, download: `ferry-${id}.har`, text: 'Download HAR' })),
    curlBox,
    editForm,
    h('div', { class: 'exchange' },
      h('section', { class: 'panel half', 'aria-labelledby': 'req-h' },
        h('h2', { id: 'req-h', text: 'Request' }),
        h('p', { class: 'mono wrap' }, `${d.request.method} `, h('span', { text: d.request.url }), ` ${d.request.http_version}`),
        h('h3', { text: 'Headers' }),
        headersTable(d.request.headers),
        h('h3', { text: 'Body' }),
        bodyView('request-body', d.request.body, `${base}/body/request`)),
      h('section', { class: 'panel half', 'aria-labelledby': 'res-h' },
        h('h2', { id: 'res-h', text: 'Response' }),
        res
          ? [h('p', {}, statusEl(res.status)),
            h('h3', { text: 'Headers' }),
            headersTable(res.headers),
            h('h3', { text: 'Body' }),
            bodyView('response-body', res.body, `${base}/body/response`)]
          : [h('p', { class: 'muted', text: d.error ? `No response: ${d.error}` : 'No response.' }),
            h('pre', { id: 'response-body', class: 'body muted', text: '(no response)' })])),
    h('section', { class: 'panel' },
      h('h2', { text: 'Timings' }),
      meta([
        ['Received', timeEl(d.timings.received_at)],
        ['Responded', h('span', {}, timeEl(d.timings.responded_at), delta(d.timings.received_at, d.timings.responded_at))],
        ['Done', h('span', {}, timeEl(d.timings.done_at), delta(d.timings.received_at, d.timings.done_at))],
        ['Sizes', `${fmtSize(d.request_size)} in, ${fmtSize(d.response_size)} out`],
      ])));
  ctx.ready();
}

/** The edit & replay form, filled from the captured request. */
function fillEditForm(form, d, replay) {
  const body = d.request.body;
  // Only a whole text body can be edited in place; a cut or binary one is
  // sent as captured unless the user types a replacement.
  const editable = body.text != null && !body.truncated && !body.decoded;
  const rows = h('div', { class: 'kv-rows' });
  const addRow = (name = '', value = '') => {
    const row = h('div', { class: 'kv' },
      h('input', { class: 'edit-header-name mono', 'aria-label': 'Header name', value: name, placeholder: 'name' }),
      h('input', { class: 'edit-header-value mono', 'aria-label': 'Header value', value, placeholder: 'value' }),
      h('button', { type: 'button', class: 'secondary small', text: 'Remove', 'aria-label': `Remove header ${name}`, onclick: () => row.remove() }));
    rows.append(row);
    return row;
  };
  d.request.headers.forEach((f) => addRow(f.name, f.value));
  const textarea = h('textarea', {
    id: 'edit-body', class: 'mono', rows: 12, spellcheck: 'false',
    value: editable ? body.text : '',
    placeholder: body.size === 0 ? ''
      : body.truncated ? `The captured body was cut (${fmtSize(body.size)} sent, ${fmtSize(body.captured)} kept): type the body to send.`
        : `The captured body (${fmtSize(body.size)}) is sent unless you type one here.`,
    required: body.truncated,
  });
  const send = h('button', { type: 'submit', id: 'edit-send', text: 'Send' });
  replace(form,
    h('h2', { text: 'Edit & replay' }),
    h('div', { class: 'grid-form' },
      h('label', { for: 'edit-target', text: 'Send to' }),
      h('input', { id: 'edit-target', type: 'url', placeholder: 'empty: through its tunnel (or to its webhook URL); or https://host:port', class: 'mono' }),
      h('label', { for: 'edit-method', text: 'Method' }),
      // A text field, not a select: a replay may use any method (PURGE, PROPFIND …).
      h('input', { id: 'edit-method', class: 'mono', list: 'edit-methods', value: d.method, required: true, autocomplete: 'off', spellcheck: 'false' }),
      h('datalist', { id: 'edit-methods' }, METHODS.map((m) => h('option', { value: m }))),
      h('label', { for: 'edit-path', text: 'Path' }),
      h('input', { id: 'edit-path', class: 'mono', value: d.path, required: true })),
    h('fieldset', {}, h('legend', { text: 'Headers' }), rows,
      h('button', { type: 'button', id: 'edit-add-header', class: 'secondary small', text: 'Add header', onclick: () => addRow().querySelector('input').focus() })),
    h('label', { for: 'edit-body', text: 'Body' }),
    textarea,
    h('div', { class: 'actions' },
      send,
      h('button', { type: 'button', class: 'secondary', text: 'Format JSON', onclick: () => {
        try {
          textarea.value = JSON.stringify(JSON.parse(textarea.value), null, 2);
        } catch {
          notify('The body is not JSON');
        }
      } })));

  form.onsubmit = (event) => {
    event.preventDefault();
    const edits = {};
    const target = form.querySelector('#edit-target').value.trim();
    const method = form.querySelector('#edit-method').value.trim().toUpperCase();
    const path = form.querySelector('#edit-path').value;
    if (target) edits.target = target;
    if (method !== d.method) edits.method = method;
    if (path !== d.path) edits.path = path;
    // The API edits headers by name (set, or null to remove), so compare
    // each name's values with the captured ones.
    const group = (pairs) => pairs.reduce((m, [n, v]) => m.set(n, [...(m.get(n) || []), v]), new Map());
    const before = group(d.request.headers.map((f) => [f.name.toLowerCase(), f.value]));
    const after = group([...rows.querySelectorAll('.kv')]
      .map((r) => [r.querySelector('.edit-header-name').value.trim().toLowerCase(), r.querySelector('.edit-header-value').value])
      .filter(([n]) => n));
    const headers = {};
    for (const [n, vals] of after) if (before.get(n)?.join('\n') !== vals.join('\n')) headers[n] = vals.join(', ');
    for (const n of before.keys()) if (!after.has(n)) headers[n] = null;
    if (Object.keys(headers).length) edits.headers = headers;
    // A textarea reads CRLF back as LF: compare in that form, and give an
    // edited body the captured line endings back (multipart boundaries and
    // signatures depend on them).
    const crlf = editable && body.text.includes('\r\n');
    const shown = editable ? body.text.replace(/\r\n?/g, '\n') : '';
    if (textarea.value !== shown) edits.body = crlf ? textarea.value.replace(/\n/g, '\r\n') : textarea.value;
    replay(edits, send);
  };
}
