// Ferry dashboard: hash router, session, error banner.
import { api, get, onUnauthorized } from './api.js';
import { h, replace, showError, clearError } from './dom.js';
import * as tunnels from './tunnels.js';
import * as log from './log.js';
import * as detail from './detail.js';
import * as webhooks from './webhooks.js';

const main = document.getElementById('main');

const routes = [
  [/^\/tunnels$/, tunnels.render, 'tunnels'],
  [/^\/log$/, log.render, 'log'],
  [/^\/requests\/([^/]+)$/, detail.render, 'log'],
  [/^\/webhooks$/, webhooks.renderList, 'webhooks'],
  [/^\/webhooks\/new$/, webhooks.renderForm, 'webhooks'],
  [/^\/webhooks\/([^/]+)$/, webhooks.renderForm, 'webhooks'],
  [/^\/deliveries\/([^/]+)$/, webhooks.renderDelivery, 'webhooks'],
];

let session = null;
let routed = null; // the hash on screen, so popstate and hashchange route once
let current = null; // the AbortController of the view on screen

function setReady(ready) {
  document.body.dataset.ready = ready ? '1' : '0';
}

/** Parses `#/path?query` into its path and query. */
function currentRoute() {
  const hash = window.location.hash.replace(/^#/, '') || '/';
  const i = hash.indexOf('?');
  return {
    path: i < 0 ? hash : hash.slice(0, i),
    query: new URLSearchParams(i < 0 ? '' : hash.slice(i + 1)),
  };
}

function startView() {
  if (current) current.abort();
  current = new AbortController();
  clearError();
  setReady(false);
  return current.signal;
}

function markNav(section) {
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.nav === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

async function route() {
  routed = window.location.hash;
  if (session && !session.open && !session.signed_in) return showSignIn();
  const { path, query } = currentRoute();
  const match = routes.find(([re]) => re.test(path));
  if (!match) {
    window.location.replace('#/log');
    return;
  }
  const [re, view, section] = match;
  const signal = startView();
  let params;
  try {
    params = path.match(re).slice(1).map(decodeURIComponent);
  } catch {
    fail(new Error(`${path} is not a page of the dashboard: its escapes are malformed`), signal);
    return;
  }
  markNav(section);
  replace(main, h('p', { class: 'muted', text: 'Loading…' }));
  const ctx = {
    main,
    params,
    query,
    signal,
    ready: () => !signal.aborted && setReady(true),
    fail: (err) => fail(err, signal),
    title: (t) => (document.title = `${t} · Ferry`),
    rerender: route,
    // Records a view's own state (the log's filters) in the hash without routing.
    replaceHash: (hash) => {
      history.replaceState(null, '', hash);
      routed = window.location.hash;
    },
  };
  try {
    await view(ctx);
  } catch (err) {
    fail(err, signal);
  }
}

/**
 * Shows an error: always in the banner, and in place of the view when the
 * view had nothing on screen yet, so no panel stays blank.
 */
function fail(err, signal) {
  if (signal.aborted || err.name === 'AbortError') return;
  if (err.status === 401 && session && !session.open) return; // the sign-in form is up
  showError(err.message);
  if (document.body.dataset.ready !== '1') {
    replace(
      main,
      h('section', { class: 'panel error-panel' },
        h('h1', { text: 'This page could not be loaded' }),
        h('p', { text: err.message }),
        h('button', { type: 'button', onclick: route, text: 'Try again' })),
    );
    setReady(true);
  }
}

function renderAccount() {
  const box = document.getElementById('account');
  document.body.classList.toggle('signed-out', !!session && !session.open && !session.signed_in);
  if (!session || session.open) {
    replace(box, session?.open ? h('span', { class: 'muted', text: 'open relay' }) : null);
    return;
  }
  if (!session.signed_in) return replace(box);
  replace(
    box,
    h('span', { class: 'muted', text: session.account || '' }),
    h('button', { type: 'button', id: 'sign-out', class: 'secondary', onclick: signOut, text: 'Sign out' }),
  );
}

// `why`: the reason a session ended (expired, or two cookies sent), shown
// above the form.
function showSignIn(why) {
  startView();
  document.getElementById('notice').hidden = true; // news of the account that left
  markNav(null);
  renderAccount();
  document.title = 'Sign in · Ferry';
  const input = h('input', { id: 'token', type: 'password', name: 'token', autocomplete: 'current-password', required: true });
  const error = h('p', { id: 'sign-in-error', class: 'form-error', role: 'alert', hidden: !why, text: why || '' });
  const button = h('button', { id: 'sign-in', type: 'submit', text: 'Sign in' });
  const form = h('form', { class: 'panel sign-in' },
    h('h1', { text: 'Sign in' }),
    h('p', { class: 'muted', text: 'Use an API token of this relay. The dashboard keeps a session cookie; the token is not stored.' }),
    h('label', { for: 'token', text: 'Token' }),
    input,
    error,
    h('div', { class: 'actions' }, button));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    setReady(false);
    button.disabled = true;
    error.hidden = true;
    try {
      session = await api('POST', '/session', { token: input.value.trim() });
      renderAccount();
      route();
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      setReady(true);
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  replace(main, form);
  input.focus();
  setReady(true);
}

async function signOut() {
  try {
    await api('DELETE', '/session', {});
    session = { ...session, signed_in: false, account: null };
    showSignIn();
  } catch (err) {
    showError(err.message);
  }
}

async function boot() {
  document.getElementById('error-close').addEventListener('click', clearError);
  onUnauthorized((err) => {
    if (session?.open) return;
    session = { ...(session || {}), signed_in: false, open: false };
    showSignIn(err.code === 'unauthorized' ? '' : err.message);
  });
  // popstate comes synchronously with a fragment navigation, hashchange a
  // task later: routing on the first means that right after navigating,
  // data-ready already speaks of the new view.
  const navigated = () => window.location.hash !== routed && route();
  window.addEventListener('popstate', navigated);
  window.addEventListener('hashchange', navigated);
  try {
    session = await get('/session');
  } catch (err) {
    if (err.status === 401) {
      session = { signed_in: false, open: false };
      showSignIn(err.message);
      return;
    }
    fail(err, startView());
    return;
  }
  renderAccount();
  route();
}

boot();
