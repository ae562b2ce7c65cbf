// A captured body, shown as pretty JSON (highlighted), text or hex.
import { h, replace, fmtSize, base64Bytes } from './dom.js';

// Beyond these the page would slow to a crawl; the download has it all.
const HIGHLIGHT_LIMIT = 256 * 1024;
const HEX_LIMIT = 64 * 1024;

// Deeper JSON is shown as text: indentation grows with depth, so pretty
// output of a body nested 10,000 deep (20 KB) would take gigabytes.
const MAX_DEPTH = 64;

const TOKEN = /\s+|"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null|[{}[\],:]/y;

/**
 * Re-indents JSON text token by token, so numbers keep their exact digits
 * (JSON.parse would round large ids). Answers [class, text] pairs, or null
 * when the text is not JSON.
 */
export function prettyJson(text) {
  try {
    JSON.parse(text);
  } catch {
    return null;
  }
  const tokens = [];
  TOKEN.lastIndex = 0;
  while (TOKEN.lastIndex < text.length) {
    const m = TOKEN.exec(text);
    if (!m) return null;
    if (!/^\s/.test(m[0])) tokens.push(m[0]);
  }
  const out = [];
  let depth = 0;
  const newline = () => out.push(['', `\n${'  '.repeat(depth)}`]);
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    if (t === '{' || t === '[') {
      out.push(['p', t]);
      if (tokens[i + 1] === '}' || tokens[i + 1] === ']') {
        out.push(['p', tokens[++i]]);
      } else {
        depth++;
        if (depth > MAX_DEPTH) return null;
        newline();
      }
    } else if (t === '}' || t === ']') {
      depth--;
      newline();
      out.push(['p', t]);
    } else if (t === ',') {
      out.push(['p', ',']);
      newline();
    } else if (t === ':') {
      out.push(['p', ': ']);
    } else if (t[0] === '"') {
      out.push([tokens[i + 1] === ':' ? 'k' : 's', t]);
    } else if (t === 'true' || t === 'false') {
      out.push(['b', t]);
    } else if (t === 'null') {
      out.push(['n', t]);
    } else {
      out.push(['d', t]);
    }
  }
  return out;
}

export function hexDump(bytes) {
  const lines = [];
  const end = Math.min(bytes.length, HEX_LIMIT);
  for (let off = 0; off < end; off += 16) {
    const row = bytes.subarray(off, Math.min(off + 16, end));
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, '0')).join(' ');
    const ascii = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${off.toString(16).padStart(8, '0')}  ${hex.padEnd(47)}  ${ascii}`);
  }
  return lines.join('\n');
}

/**
 * The body pane: mode tabs, the content in pre#id, and notes on what is
 * missing (cut capture, decoding cap) with a link to the kept bytes.
 */
export function bodyView(id, body, downloadHref) {
  const pre = h('pre', { id, class: 'body', tabindex: 0 });
  if (!body || body.size === 0) {
    pre.textContent = '(no body)';
    pre.classList.add('muted');
    return h('div', { class: 'body-view' }, pre);
  }
  const decoded = body.decoded || null;
  const text = decoded ? decoded.text : body.text;
  const json = text != null && text.length <= HIGHLIGHT_LIMIT * 4 ? prettyJson(text) : null;
  let bytes = null; // decoded lazily: a 1 MiB body is only hexed on demand

  const modes = { pretty: 'Pretty', text: 'Text', hex: 'Hex' };
  const available = { pretty: !!json, text: text != null, hex: true };
  const show = (mode) => {
    for (const [m, tab] of Object.entries(tabs)) tab.setAttribute('aria-selected', String(m === mode));
    pre.dataset.mode = mode;
    if (mode === 'pretty') {
      if (text.length > HIGHLIGHT_LIMIT) {
        pre.textContent = json.map(([, t]) => t).join('');
      } else {
        replace(pre, json.map(([cls, t]) => (cls ? h('span', { class: `j-${cls}`, text: t }) : t)));
      }
    } else if (mode === 'text') {
      pre.textContent = text;
    } else {
      bytes = bytes || base64Bytes(body.base64);
      pre.textContent = hexDump(bytes) || '(no bytes kept)';
    }
  };
  const tabs = {};
  for (const [mode, label] of Object.entries(modes)) {
    tabs[mode] = h('button', {
      type: 'button', role: 'tab', class: 'tab', text: label, disabled: !available[mode],
      dataset: { mode }, onclick: () => show(mode),
    });
  }

  const notes = [];
  if (decoded) notes.push(`Shown decoded from its content-encoding (${fmtSize(decoded.size)}); Hex shows the bytes as sent.`);
  if (body.truncated) notes.push(`Cut: ${fmtSize(body.size)} (${body.size} bytes) passed through, the first ${fmtSize(body.captured)} were kept.`);
  if (decoded?.truncated) notes.push(`The decoded view stops at ${fmtSize(decoded.size)}${decoded.error ? `: ${decoded.error}` : ''}.`);
  else if (decoded?.error) notes.push(`Decoding stopped: ${decoded.error}.`);
  if (body.captured > HEX_LIMIT) notes.push(`Hex shows the first ${fmtSize(HEX_LIMIT)}.`);
  const large = body.truncated || decoded?.truncated || body.size > body.captured;

  const view = h('div', { class: 'body-view' },
    h('div', { class: 'body-bar' },
      h('div', { role: 'tablist', 'aria-label': 'Body view', class: 'tabs' }, Object.values(tabs)),
      h('span', { class: 'muted', text: fmtSize(body.size) }),
      h('a', { href: downloadHref, download: '', class: large ? 'button' : '', text: large ? `Download the ${fmtSize(body.captured)} kept` : 'Download' })),
    notes.length ? h('p', { class: large ? 'note warn' : 'note', text: notes.join(' ') }) : null,
    pre);
  show(json ? 'pretty' : text != null ? 'text' : 'hex');
  return view;
}
