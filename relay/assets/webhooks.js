// #/webhooks, #/webhooks/new, #/webhooks/{id} and #/deliveries/{id}.
import { api, get, enc, query } from './api.js';
import { h, replace, timeEl, fmtMs, statusEl, notify, every, clearError } from './dom.js';

const METHODS = ['POST', 'PUT', 'PATCH', 'GET', 'DELETE'];
const POLL_MS = 3000;
const GROUP_LABELS = { document: 'Document', blueprint: 'Blueprint', project: 'Project member', other: 'Other' };

function stateEl(state) {
  const cls = { succeeded: 'ok', failed: 'bad', pending: 'warn' }[state] || '';
  return h('span', { class: `pill ${cls}`, text: state || '—' });
}

function matches(action, type) {
  return action === '*' || action === type || (action.endsWith('.*') && type.startsWith(action.slice(0, -1)));
}

export async function renderList(ctx) {
  ctx.title('Webhooks');
  const list = await get('/webhooks', ctx.signal);
  const create = h('button', { type: 'button', id: 'webhook-create', text: 'Create webhook', onclick: () => (window.location.hash = '#/webhooks/new') });
  replace(ctx.main,
    h('div', { class: 'page-head' }, h('h1', { text: 'Webhooks' }), create),
    list.items.length === 0
      ? h('p', { class: 'muted empty', text: 'No webhooks yet. Create one to have events sent to a URL.' })
      : h('div', { class: 'table-wrap' },
        h('table', { id: 'webhooks', class: 'grid' },
          h('thead', {}, h('tr', {}, ['Name', 'Method', 'URL', 'Actions', 'Enabled', 'Last delivery'].map((t) => h('th', { scope: 'col', text: t })))),
          h('tbody', {}, list.items.map((w) => h('tr', { dataset: { id: w.id } },
            h('td', {}, h('a', { href: `#/webhooks/${enc(w.id)}`, text: w.name })),
            h('td', { class: 'mono', text: w.method }),
            h('td', { class: 'mono url', title: w.url, text: w.url }),
            h('td', { class: 'mono', text: w.actions.join(', ') }),
            h('td', {}, w.enabled ? h('span', { class: 'pill ok', text: 'enabled' }) : h('span', { class: 'pill bad', title: w.disabled_reason || '', text: 'disabled' })),
            h('td', {}, w.last_delivery ? stateEl(w.last_delivery) : h('span', { class: 'muted', text: 'none yet' }))))))));
  ctx.ready();
}

/** Checkboxes for the catalogue, grouped by the part before the first dot. */
function actionsField(types, chosen) {
  const groups = new Map();
  for (const t of types) {
    const group = t.name.includes('.') ? t.name.split('.')[0] : 'other';
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(t);
  }
  // Chosen actions the catalogue has no box for (say `project.member.*`) stay visible and kept.
  const boxes = new Set(['*', ...types.map((t) => t.name), ...[...groups.keys()].filter((g) => g !== 'other').map((g) => `${g}.*`)]);
  const extra = chosen.filter((a) => !boxes.has(a));
  if (extra.length) groups.set('other', [...(groups.get('other') || []), ...extra.map((name) => ({ name, description: 'a wildcard or type kept from before' }))]);
  const other = groups.get('other');
  groups.delete('other');
  if (other) groups.set('other', other); // last

  let n = 0;
  const box = (value, label, description, cls) => {
    const id = `action-${n++}`;
    return h('div', { class: `check ${cls || ''}` },
      h('input', { type: 'checkbox', id, name: 'action', value, checked: chosen.includes(value) }),
      h('label', { for: id }, h('span', { class: 'mono', text: label }), description ? h('span', { class: 'muted', text: ` — ${description}` }) : null));
  };
  const field = h('fieldset', { class: 'actions-field' },
    h('legend', { text: 'Actions' }),
    box('*', '*', 'every event type', 'wildcard'),
    h('div', { class: 'groups' }, [...groups].map(([group, list]) => h('fieldset', { class: 'group' },
      h('legend', { text: GROUP_LABELS[group] || group }),
      group !== 'other' ? box(`${group}.*`, `${group}.*`, `every ${group} event, including ones added later`, 'wildcard') : null,
      list.map((t) => box(t.name, t.name, t.description))))));

  // A checked wildcard covers its group: its boxes are shown checked and
  // left out of what is saved.
  const sync = () => {
    const all = field.querySelector('input[value="*"]').checked;
    for (const input of field.querySelectorAll('input[name=action]')) {
      if (input.value === '*') continue;
      const covering = all || [...field.querySelectorAll('.wildcard input:checked')]
        .some((w) => w !== input && w.value !== '*' && matches(w.value, input.value));
      input.disabled = covering;
      input.closest('.check').classList.toggle('covered', covering);
    }
  };
  field.addEventListener('change', sync);
  sync();
  return field;
}

function headerRows(headers) {
  const rows = h('div', { class: 'kv-rows', id: 'wh-headers' });
  const add = (name = '', value = '') => {
    const row = h('div', { class: 'kv' },
      h('input', { class: 'wh-header-name mono', 'aria-label': 'Header name', placeholder: 'name', value: name }),
      h('input', { class: 'wh-header-value mono', 'aria-label': 'Header value', placeholder: 'value', value }),
      h('button', { type: 'button', class: 'secondary small', text: 'Remove', 'aria-label': 'Remove this header', onclick: () => row.remove() }));
    rows.append(row);
    return row;
  };
  Object.entries(headers || {}).forEach(([k, v]) => add(k, v));
  const addButton = h('button', { type: 'button', id: 'wh-add-header', class: 'secondary small', text: 'Add header', onclick: () => add().querySelector('input').focus() });
  return h('fieldset', {}, h('legend', { text: 'Headers' }), rows, addButton);
}

export async function renderForm(ctx) {
  const [id] = ctx.params;
  const [types, hook] = await Promise.all([
    get('/event-types', ctx.signal),
    id ? get(`/webhooks/${enc(id)}`, ctx.signal) : null,
  ]);
  const w = hook || { name: '', method: 'POST', url: '', actions: [], headers: {} };
  ctx.title(hook ? hook.name : 'New webhook');

  const formError = h('p', { class: 'form-error', role: 'alert', hidden: true });
  const save = h('button', { type: 'submit', id: 'wh-save', text: hook ? 'Save' : 'Create' });
  const form = h('form', { class: 'panel webhook-form', novalidate: true },
    h('div', { class: 'grid-form' },
      h('label', { for: 'wh-name', text: 'Name' }),
      h('input', { id: 'wh-name', required: true, value: w.name, maxlength: 200 }),
      h('label', { for: 'wh-method', text: 'HTTP method' }),
      h('select', { id: 'wh-method', value: w.method }, METHODS.map((m) => h('option', { value: m, text: m }))),
      h('label', { for: 'wh-url', text: 'URL' }),
      h('input', { id: 'wh-url', type: 'url', required: true, class: 'mono', value: w.url, placeholder: 'https://api.example.com/hooks' })),
    actionsField(types.items, w.actions),
    headerRows(w.headers),
    formError,
    h('div', { class: 'actions' }, save, h('a', { href: '#/webhooks', text: 'Cancel' })));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const headers = {};
    for (const row of form.querySelectorAll('#wh-headers .kv')) {
      const name = row.querySelector('.wh-header-name').value.trim();
      if (name) headers[name] = row.querySelector('.wh-header-value').value;
    }
    const input = {
      name: form.querySelector('#wh-name').value.trim(),
      method: form.querySelector('#wh-method').value,
      url: form.querySelector('#wh-url').value.trim(),
      actions: [...form.querySelectorAll('input[name=action]:checked:not(:disabled)')].map((i) => i.value),
      headers,
    };
    formError.hidden = true;
    save.disabled = true;
    try {
      const saved = await api(hook ? 'PUT' : 'POST', hook ? `/webhooks/${enc(hook.id)}` : '/webhooks', input);
      notify(hook ? 'Saved' : 'Webhook created');
      clearError();
      if (hook) ctx.rerender();
      else window.location.hash = `#/webhooks/${enc(saved.id)}`;
    } catch (err) {
      formError.textContent = err.message;
      formError.hidden = false;
      ctx.fail(err);
    } finally {
      save.disabled = false;
    }
  });

  replace(ctx.main,
    h('div', { class: 'page-head' },
      h('h1', { text: hook ? hook.name : 'New webhook' }),
      hook ? (hook.enabled ? h('span', { class: 'pill ok', text: 'enabled' }) : h('span', { class: 'pill bad', text: 'disabled' })) : null,
      h('a', { href: '#/webhooks', text: '← Webhooks' })),
    hook ? manage(ctx, hook, types.items) : null,
    // Deliveries first on a saved webhook: they change, its settings rarely do.
    hook ? await deliveries(ctx, hook) : null,
    hook ? h('h2', { class: 'section', text: 'Settings' }) : null,
    form);
  ctx.ready();
}

/** Secret, test, enable and delete: the controls of a saved webhook. */
function manage(ctx, hook, types) {
  const again = () => ctx.rerender();
  const call = async (button, method, path, body, done) => {
    button.disabled = true;
    try {
      const answer = await api(method, path, body);
      clearError();
      await done(answer);
    } catch (err) {
      ctx.fail(err);
    } finally {
      button.disabled = false;
    }
  };
  const secret = h('input', { id: 'wh-secret', type: 'password', readonly: true, class: 'mono', value: hook.secret, 'aria-label': 'Signing secret', size: 50 });
  const reveal = h('button', { type: 'button', id: 'wh-reveal', class: 'secondary small', text: 'Reveal', 'aria-pressed': 'false' });
  reveal.addEventListener('click', () => {
    const shown = secret.type === 'password';
    secret.type = shown ? 'text' : 'password';
    reveal.textContent = shown ? 'Hide' : 'Reveal';
    reveal.setAttribute('aria-pressed', String(shown));
  });
  const copy = h('button', { type: 'button', id: 'wh-copy', class: 'secondary small', text: 'Copy' });
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(secret.value);
      notify('Secret copied');
    } catch {
      secret.type = 'text';
      secret.select();
      notify('The clipboard is not available: the secret is selected, copy it with Ctrl+C');
    }
  });
  const rotate = h('button', { type: 'button', id: 'wh-rotate', class: 'secondary small', text: 'Rotate' });
  // No confirmation: for 24 hours deliveries carry both signatures, so a
  // rotation never breaks a receiver that keeps the old secret for a while.
  rotate.addEventListener('click', () => call(rotate, 'POST', `/webhooks/${enc(hook.id)}/rotate-secret`, {},
    () => { notify('Secret rotated: the previous one still signs for 24 hours'); return again(); }));

  const testTypes = types.map((t) => t.name).filter((t) => hook.actions.some((a) => matches(a, t)));
  const testType = h('select', { id: 'wh-test-type', 'aria-label': 'Event type to send' }, testTypes.map((t) => h('option', { value: t, text: t })));
  const test = h('button', { type: 'button', id: 'wh-test', class: 'secondary', text: 'Send test event' });
  test.addEventListener('click', () => call(test, 'POST', `/webhooks/${enc(hook.id)}/test`, testType.value ? { type: testType.value } : {},
    (a) => notify(`Test event ${a.id} queued (${a.queued} delivery)`)));

  const toggle = h('button', { type: 'button', id: 'wh-toggle', class: 'secondary', text: hook.enabled ? 'Disable' : 'Enable' });
  toggle.addEventListener('click', () => call(toggle, 'PUT', `/webhooks/${enc(hook.id)}`, { enabled: !hook.enabled },
    () => { notify(hook.enabled ? 'Disabled' : 'Enabled'); return again(); }));
  // Deleting asks again in the page, not with confirm(): a dialog would
  // block the page and browser automation dismisses it.
  const really = h('button', { type: 'button', id: 'wh-delete-confirm', class: 'danger', hidden: true, text: `Delete "${hook.name}" and its queue` });
  const del = h('button', { type: 'button', id: 'wh-delete', class: 'danger', text: 'Delete…', onclick: () => { really.hidden = false; really.focus(); } });
  really.addEventListener('click', () => call(really, 'DELETE', `/webhooks/${enc(hook.id)}`, {},
    () => { notify('Webhook deleted'); window.location.hash = '#/webhooks'; }));

  return h('section', { class: 'panel manage' },
    h('div', { class: 'row' },
      h('label', { for: 'wh-secret', text: 'Signing secret' }), secret, reveal, copy, rotate),
    hook.previous_secret_until ? h('p', { class: 'muted' }, 'The previous secret still signs until ', timeEl(hook.previous_secret_until), '.') : null,
    !hook.enabled && hook.disabled_reason ? h('p', { class: 'note warn', text: `Disabled: ${hook.disabled_reason}` }) : null,
    hook.failing_since ? h('p', { class: 'note warn' }, 'Deliveries failing since ', timeEl(hook.failing_since), '.') : null,
    h('div', { class: 'row' }, testType, test, toggle, del, really),
    h('p', { class: 'muted small' }, 'Created ', timeEl(hook.created_at), ', updated ', timeEl(hook.updated_at), '. Id ', h('span', { class: 'mono', text: hook.id })));
}

function deliveryRow(d) {
  return h('tr', { dataset: { id: d.id } },
    h('td', { class: 'nowrap' }, timeEl(d.created_at)),
    h('td', { class: 'mono', text: d.event_type }),
    h('td', { class: 'status' }, stateEl(d.state), ' ', statusEl(d.last_status)),
    h('td', { class: 'num', text: d.attempts }),
    h('td', { class: 'nowrap' }, d.next_attempt_at ? timeEl(d.next_attempt_at) : '—'),
    h('td', { class: 'error-text', text: d.last_error || '' }),
    h('td', {}, h('a', { href: `#/deliveries/${enc(d.id)}`, class: 'mono', text: d.id })));
}

/** The webhook's deliveries, newest first, refreshed while the page is open. */
async function deliveries(ctx, hook) {
  const tbody = h('tbody');
  const empty = h('p', { class: 'muted', text: 'No deliveries yet. Send a test event or post an event.', hidden: true });
  const more = h('button', { type: 'button', class: 'secondary', text: 'Load older', hidden: true });
  const state = h('select', { id: 'deliveries-state', 'aria-label': 'Deliveries in state' },
    [['', 'all'], ['pending', 'pending'], ['succeeded', 'succeeded'], ['failed', 'failed']].map(([v, t]) => h('option', { value: v, text: t })));
  let older = []; // pages loaded beyond the first, kept across refreshes
  let cursor = null;
  let lastJson = '';
  const refresh = async () => {
    const page = await get(`/webhooks/${enc(hook.id)}/deliveries${query({ state: state.value, limit: 50 })}`, ctx.signal);
    const json = JSON.stringify(page);
    if (json === lastJson) return;
    lastJson = json;
    const seen = new Set(page.items.map((d) => d.id));
    replace(tbody, [...page.items, ...older.filter((d) => !seen.has(d.id))].map(deliveryRow));
    if (!older.length) cursor = page.next_cursor;
    more.hidden = !cursor;
    empty.hidden = tbody.children.length > 0;
  };
  more.addEventListener('click', async () => {
    try {
      const page = await get(`/webhooks/${enc(hook.id)}/deliveries${query({ state: state.value, limit: 50, before: cursor })}`, ctx.signal);
      older = [...older, ...page.items];
      cursor = page.next_cursor;
      lastJson = '';
      await refresh();
    } catch (err) {
      ctx.fail(err);
    }
  });
  state.addEventListener('change', () => {
    older = [];
    lastJson = '';
    refresh().catch(ctx.fail);
  });
  await refresh();
  // Polling keeps going after a failed refresh: the banner says why meanwhile.
  setTimeout(() => every(POLL_MS, () => refresh().catch(ctx.fail), ctx.signal), POLL_MS);
  return h('section', { class: 'panel' },
    h('div', { class: 'page-head' }, h('h2', { text: 'Deliveries' }), state),
    h('div', { class: 'table-wrap' },
      h('table', { id: 'deliveries', class: 'grid' },
        h('thead', {}, h('tr', {}, ['Queued', 'Event', 'State / status', 'Attempts', 'Next attempt', 'Last error', 'Delivery'].map((t) => h('th', { scope: 'col', text: t })))),
        tbody)),
    empty,
    h('div', { class: 'more' }, more));
}

export async function renderDelivery(ctx) {
  const [id] = ctx.params;
  let first = true;
  let state = 'pending';
  await every(POLL_MS, async () => {
    if (state !== 'pending') return; // only a pending delivery changes on its own
    let d;
    try {
      d = await get(`/deliveries/${enc(id)}`, ctx.signal);
    } catch (err) {
      if (!first) return ctx.fail(err);
      state = 'unknown';
      throw err;
    }
    ctx.title(`Delivery ${d.id}`);
    state = d.state;
    const resend = h('button', { type: 'button', id: 'resend', text: 'Resend', disabled: d.state === 'pending', title: d.state === 'pending' ? 'Still pending: its next attempt comes on its own' : 'Queue one more attempt' });
    resend.addEventListener('click', async () => {
      resend.disabled = true;
      try {
        const again = await api('POST', `/deliveries/${enc(d.id)}/resend`, {});
        notify('Queued again');
        state = again.state;
      } catch (err) {
        ctx.fail(err);
        resend.disabled = false;
      }
    });
    replace(ctx.main,
      h('div', { class: 'page-head' },
        h('h1', {}, 'Delivery ', h('span', { class: 'mono', text: d.id })), stateEl(d.state),
        h('a', { href: `#/webhooks/${enc(d.webhook_id)}`, id: 'delivery-webhook', text: '← Its webhook' })),
      h('dl', { class: 'meta' },
        h('dt', { text: 'Webhook' }), h('dd', {}, h('a', { href: `#/webhooks/${enc(d.webhook_id)}`, class: 'mono', text: d.webhook_id })),
        h('dt', { text: 'Event' }), h('dd', {}, h('span', { class: 'mono', text: d.event_type }), ' ', h('span', { class: 'mono muted', text: d.event_id })),
        h('dt', { text: 'Queued' }), h('dd', {}, timeEl(d.created_at)),
        h('dt', { text: 'Last status' }), h('dd', {}, statusEl(d.last_status)),
        h('dt', { text: 'Attempts' }), h('dd', { text: String(d.attempts) }),
        d.next_attempt_at ? [h('dt', { text: 'Next attempt' }), h('dd', {}, timeEl(d.next_attempt_at))] : null,
        d.last_error ? [h('dt', { text: 'Last error' }), h('dd', { class: 'error-text', text: d.last_error })] : null),
      h('div', { class: 'actions' }, resend),
      h('section', { class: 'panel' },
        h('h2', { text: 'Attempts' }),
        d.attempt_log.length === 0
          ? h('p', { class: 'muted', text: 'No attempt yet.' })
          : h('table', { id: 'attempts', class: 'grid' },
            h('thead', {}, h('tr', {}, ['#', 'At', 'Status', 'Duration', 'Error', 'Activity log'].map((t) => h('th', { scope: 'col', text: t })))),
            h('tbody', {}, d.attempt_log.map((a) => h('tr', { dataset: { id: a.request_id } },
              h('td', { class: 'num', text: a.number }),
              h('td', { class: 'nowrap' }, timeEl(a.at)),
              h('td', { class: 'status' }, statusEl(a.status)),
              h('td', { class: 'num', text: fmtMs(a.duration_ms) }),
              h('td', { class: 'error-text', text: a.error || '' }),
              h('td', {}, h('a', { href: `#/requests/${enc(a.request_id)}`, text: 'open entry' }))))))));
    if (first) ctx.ready();
    first = false;
  }, ctx.signal);
}
