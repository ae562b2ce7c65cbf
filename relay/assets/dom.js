// DOM building and formatting. Everything that reaches the page goes through
// textContent or attributes: request data is attacker-controlled, so no
// innerHTML anywhere.

/** h('a', {href, class, text, onclick, dataset}, ...children) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  append(el, children); // before attributes, so a select's value finds its option
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') el.textContent = value;
    else if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'style') throw new Error('inline styles break the CSP: use a class');
    else if (key === 'value' || (typeof value === 'boolean' && key in el)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : value);
  }
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

const pad = (n, w = 2) => String(n).padStart(w, '0');

/** An RFC 3339 time as local time; the day only when it is not today. */
export function fmtTime(iso, ms = true) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}${ms ? `.${pad(d.getMilliseconds(), 3)}` : ''}`;
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

/** A time element with the exact value on hover. */
export function timeEl(iso) {
  return h('time', { datetime: iso || '', title: iso || '', text: fmtTime(iso) });
}

export function fmtUnix(secs) {
  if (secs === null || secs === undefined) return '—';
  return fmtTime(new Date(secs * 1000).toISOString(), false);
}

export function fmtAgo(secs) {
  if (secs === null || secs === undefined) return '—';
  const s = Math.max(0, Math.round(Date.now() / 1000 - secs));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function fmtSize(n) {
  if (n === null || n === undefined) return '—';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return '—';
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** A status code as a badge coloured by class. */
export function statusEl(status) {
  if (status === null || status === undefined) return h('span', { class: 'badge', text: '—' });
  return h('span', { class: `badge s${String(status)[0]}xx`, text: String(status) });
}

export function base64Bytes(b64) {
  const bin = atob(b64 || '');
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

let noticeTimer = 0;
/** A short-lived success message in the status region. */
export function notify(message) {
  const box = document.getElementById('notice');
  box.textContent = message;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (box.hidden = true), 4000);
}

/** Runs fn now and then every ms until signal aborts; never overlaps itself. */
export function every(ms, fn, signal) {
  let timer = 0;
  const tick = async () => {
    if (signal.aborted) return;
    try {
      await fn();
    } finally {
      if (!signal.aborted) timer = setTimeout(tick, ms);
    }
  };
  signal.addEventListener('abort', () => clearTimeout(timer));
  return tick();
}

/** The global error banner, #error. */
export function showError(message) {
  document.getElementById('error-text').textContent = message;
  document.getElementById('error').hidden = false;
}

export function clearError() {
  document.getElementById('error').hidden = true;
  document.getElementById('error-text').textContent = '';
}
