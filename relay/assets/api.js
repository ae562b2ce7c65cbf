// The relay's JSON API (docs/api.md), same origin, session cookie.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};
/** Called on every 401, so the app can show the sign-in form. */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

/**
 * Calls `/api/v1` + path. State-changing calls always carry a JSON body
 * (`{}` when there is nothing to say): the API refuses other content types.
 * Answers parsed JSON, text for other content types, null for 204.
 */
export async function api(method, path, body, signal) {
  const init = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin', signal };
  if (method !== 'GET') {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body ?? {});
  }
  let res;
  try {
    res = await fetch(`/api/v1${path}`, init);
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, 'network', `The relay cannot be reached (${err.message}).`);
  }
  return answer(res, path);
}

/**
 * Checks that a GET would succeed without reading its body (a live feed
 * never ends); throws its ApiError when not.
 */
export async function probe(path) {
  const abort = new AbortController();
  let res;
  try {
    res = await fetch(`/api/v1${path}`, { credentials: 'same-origin', signal: abort.signal });
  } catch (err) {
    throw new ApiError(0, 'network', `The relay cannot be reached (${err.message}).`);
  }
  if (res.ok) {
    abort.abort();
    return;
  }
  await answer(res, path);
}

async function answer(res, path) {
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  if ((res.headers.get('content-type') || '').includes('json')) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const detail = data && data.error;
    const err = new ApiError(
      res.status,
      detail?.code || `http_${res.status}`,
      detail?.message || `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 300)}` : ''}`,
    );
    // A refused sign-in is answered in its own form.
    if (res.status === 401 && path !== '/session') unauthorized(err);
    throw err;
  }
  return data ?? text;
}

export const get = (path, signal) => api('GET', path, undefined, signal);

/** A query string from an object, leaving out empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

export const enc = encodeURIComponent;
