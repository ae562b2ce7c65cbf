//! Captured exchanges in other tools' formats: a `curl` command that sends
//! a request again exactly as it arrived, and HAR 1.2 for browsers'
//! devtools and HTTP viewers.
//!
//! Everything in an exchange came from a stranger on the network, so the
//! command never carries it unquoted: each untrusted string reaches the
//! shell through `shell_quote` only, and bytes the shell or a terminal
//! should not see raw are spelled as `printf` escapes or base64.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::activity::decode;
use crate::store::{CapturedBody, Exchange, Header, Micros};

/// Text bodies up to this size are one argument on curl's command line.
/// Longer ones go through `printf`, a shell builtin, since Linux caps one
/// argument to an exec'd program at 128 KiB.
const INLINE_BODY_MAX: usize = 64 * 1024;
/// The most decoded response body one HAR entry holds.
const HAR_DECODE_CAP: usize = 1 << 20;

/// Why an exchange cannot be exported as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The server to send the request to is not a bare http(s) URL.
    #[error(
        "`{to}` is not a server to send the request to: {why}. \
         Use an http:// or https:// URL without a path, such as http://localhost:3000"
    )]
    InvalidTarget {
        /// What was given.
        to: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The captured request holds something curl cannot send as it was
    /// received.
    #[error("this request cannot be sent again with curl: {0}")]
    Unrepresentable(String),
}

/// A POSIX shell command that sends `exchange`'s request again with the
/// real `curl`: the same method, path and query byte for byte, every header
/// in order with its duplicates, and the exact body.
///
/// `to` (such as `http://localhost:3000`) replaces the captured scheme,
/// host and port; it takes no path, like ferry's targets, since a path
/// could mean a prefix or a replacement. Without `to` the command goes to
/// the captured URL.
///
/// What curl is told, and why:
/// - `--disable` first, so that no `~/.curlrc` adds to the request;
///   `--globoff` and `--path-as-is`, so that `[]{}` and `/../` stay as
///   they are; `--http1.0`/`--http1.1` for HTTP/1 captures, and curl's own
///   choice otherwise (HTTP/2 needs TLS or prior knowledge).
/// - Headers curl would add by itself (`Accept`, `User-Agent`, and with a
///   body `Content-Type` and `Expect`) are switched off when the capture
///   had none. Curl still writes `Host` and `Content-Length`. A captured
///   `Host` is kept only without `to`: with `to`, curl writes the target's
///   own, which dev servers that check Host accept (as with the client's
///   `--host-header rewrite`); add the public one with `-H` to send it.
///   The body is framed by `Content-Length` even if it arrived chunked,
///   so captured `content-length` and `transfer-encoding` fields are left
///   out. HTTP/2 pseudo-header fields (`:path` …) are the URL and method.
/// - A body is sent whenever the capture had one or a `content-length`:
///   readable text inline (`--data-raw`, which never reads `@file`),
///   long text through `printf`, anything else (NUL, invalid UTF-8,
///   control bytes that could rewrite a terminal) as base64 through
///   `base64 -d`.
/// - A body the capture limit cut, or an incomplete capture, gives a
///   `# warning:` line above the command, which sends what was kept.
///
/// A long body makes a long command: paste it or run it from a file, as
/// `sh -c` takes at most 128 KiB on Linux.
///
/// Errors: a `to` that is not a bare server URL, and requests curl cannot
/// send faithfully: header fields with CR, LF or NUL, a method or field
/// name that is no HTTP token, a URL with spaces, controls, non-ASCII
/// (curl percent-encodes it) or a fragment, and a HEAD with a body.
pub fn curl(exchange: &Exchange, to: Option<&str>) -> Result<String, ExportError> {
    let url = match to {
        Some(to) => format!("{}{}", target_base(to)?, path_and_query(&exchange.url)?),
        None => exchange.url.clone(),
    };
    check_url(&url)?;
    let method = exchange.method.as_str();
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(ExportError::Unrepresentable(format!(
            "the method `{}` is not an HTTP token",
            method.escape_debug()
        )));
    }
    let headers = &exchange.request_headers;
    let body = &exchange.request_body;
    let has_body = !body.bytes.is_empty() || body.size > 0 || has(headers, "content-length");
    if method == "HEAD" && has_body {
        return Err(ExportError::Unrepresentable(
            "a HEAD request with a body: curl would wait for a response body that never comes"
                .into(),
        ));
    }

    let mut options = vec!["curl --disable --globoff --path-as-is".to_owned()];
    match exchange.http_version.as_str() {
        "HTTP/1.0" => options[0].push_str(" --http1.0"),
        "HTTP/1.1" => options[0].push_str(" --http1.1"),
        _ => {}
    }
    if method == "HEAD" {
        options.push("--head".into());
    } else if method != "GET" || has_body {
        options.push(format!("--request {}", shell_quote(method)));
    }
    options.push(shell_quote(&url));
    for header in headers {
        let skip = header.name.starts_with(':')
            || header.name.eq_ignore_ascii_case("content-length")
            || header.name.eq_ignore_ascii_case("transfer-encoding")
            || (to.is_some() && header.name.eq_ignore_ascii_case("host"));
        if !skip {
            options.push(format!("-H {}", header_arg(header)?));
        }
    }
    for (name, added) in [
        ("Accept", true),
        ("User-Agent", true),
        ("Content-Type", has_body),
        ("Expect", has_body),
    ] {
        if added && !has(headers, name) {
            // An empty value after the colon makes curl leave its own out.
            options.push(format!("-H '{name}:'"));
        }
    }

    let mut command = String::new();
    if body.truncated {
        command.push_str(&format!(
            "# warning: the request body was cut at {} of {} bytes by the capture limit; \
             this command sends the part kept\n",
            body.bytes.len(),
            body.size
        ));
    }
    if exchange.incomplete {
        command.push_str(
            "# warning: part of this exchange's capture was lost; \
             the request sent may differ from the one received\n",
        );
    }
    if has_body {
        match inline_text(&body.bytes) {
            Some(text) if text.len() <= INLINE_BODY_MAX => {
                options.push(format!("--data-raw {}", shell_quote(text)));
            }
            Some(text) => {
                command.push_str(&format!("printf '%s' {} |\n  ", shell_quote(text)));
                options.push("--data-binary @-".into());
            }
            None => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&body.bytes);
                command.push_str(&format!(
                    "printf '%s' {} | base64 -d |\n  ",
                    shell_quote(&encoded)
                ));
                options.push("--data-binary @-".into());
            }
        }
    }
    command.push_str(&options.join(" \\\n  "));
    command.push('\n');
    Ok(command)
}

/// `text` as one shell word: in single quotes, inside which the shell
/// reads nothing (no `$`, backticks or backslashes), with each `'` closed,
/// escaped and reopened. `text` holds no NUL: no shell word can.
fn shell_quote(text: &str) -> String {
    debug_assert!(!text.contains('\0'), "callers keep NUL out of shell words");
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `bytes` as a `printf` format that prints them back: printable ASCII as
/// it is, `%` and `\` doubled, everything else as an octal escape. So is
/// `!`: the format stands in double quotes, where an interactive bash or
/// zsh would read `!` as history expansion even inside single quotes.
fn printf_format(bytes: &[u8]) -> String {
    let mut format = String::with_capacity(bytes.len());
    for (at, &b) in bytes.iter().enumerate() {
        match b {
            // A format starting with `-` would be read as an option.
            b'-' if at == 0 => format.push_str(r"\055"),
            b'%' => format.push_str("%%"),
            b'\\' => format.push_str(r"\\"),
            b' '..=b'~' if b != b'!' => format.push(char::from(b)),
            _ => format.push_str(&format!("\\{b:03o}")),
        }
    }
    format
}

/// Whether `c` can be shown in a command as it is: no control character a
/// terminal would act on or that hides text (CR), and no bidirectional
/// override that reorders what is shown.
fn is_inert(c: char) -> bool {
    let shown = matches!(c, '\n' | '\t') || !c.is_control();
    let reorders = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    shown && !reorders
}

/// `bytes` as text that can stand in a command as it is, if it can.
fn inline_text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|text| text.chars().all(is_inert))
}

/// One `-H` argument, quoted. An empty value is written `name;`, since
/// `name:` would remove the header instead. Values that are not readable
/// text are spelled as `printf` escapes, which curl receives as the same
/// bytes.
fn header_arg(header: &Header) -> Result<String, ExportError> {
    let name = &header.name;
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(ExportError::Unrepresentable(format!(
            "the header name `{}` is not an HTTP token",
            name.escape_debug()
        )));
    }
    if header.value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(ExportError::Unrepresentable(format!(
            "the value of header `{name}` holds CR, LF or NUL, which curl cannot send"
        )));
    }
    match std::str::from_utf8(&header.value) {
        Ok("") => Ok(shell_quote(&format!("{name};"))),
        Ok(value) if value.chars().all(is_inert) => Ok(shell_quote(&format!("{name}: {value}"))),
        _ => {
            let mut field = format!("{name}: ").into_bytes();
            field.extend_from_slice(&header.value);
            // The command substitution keeps every byte but trailing
            // newlines, and a value has none.
            Ok(format!(
                "\"$(printf {})\"",
                shell_quote(&printf_format(&field))
            ))
        }
    }
}

/// The RFC 9110 token characters: what a method or field name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `headers` has a field called `name`.
fn has(headers: &[Header], name: &str) -> bool {
    headers.iter().any(|h| h.name.eq_ignore_ascii_case(name))
}

/// `to` checked as a bare server URL, without a trailing `/`.
fn target_base(to: &str) -> Result<String, ExportError> {
    let fail = |why| ExportError::InvalidTarget {
        to: to.to_owned(),
        why,
    };
    let (scheme, rest) = to
        .split_once("://")
        .ok_or_else(|| fail("it does not start with http:// or https://"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(fail("only http:// and https:// servers take HTTP requests"));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(fail(
            "it has a path, query or fragment, but the captured path and query are sent as they are",
        ));
    }
    if authority.contains('@') {
        return Err(fail("it holds credentials; send them in a header instead"));
    }
    let host_byte = |b: u8| b.is_ascii_alphanumeric() || b"-._~:[]%".contains(&b);
    if authority.is_empty() || !authority.bytes().all(host_byte) {
        return Err(fail(
            "the host is missing or holds characters no host or port has",
        ));
    }
    let uri: http::Uri = format!("{scheme}://{authority}/")
        .parse()
        .map_err(|_| fail("the host or port is malformed"))?;
    // `http` reads `host:` and `host:abc` as having no port; a `:` after
    // the host (past an IPv6 address's `]`) means one was meant.
    let port_meant = authority
        .rsplit(']')
        .next()
        .is_some_and(|tail| tail.contains(':'));
    if port_meant && uri.port_u16().is_none_or(|port| port == 0) {
        return Err(fail("the port is not a number from 1 to 65535"));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// The path and query of an absolute URL, exactly as they are; `/` first
/// when the URL had no path.
fn path_and_query(url: &str) -> Result<String, ExportError> {
    let (_, rest) = url.split_once("://").ok_or_else(|| {
        ExportError::Unrepresentable(format!(
            "the captured URL `{}` is not absolute",
            url.escape_debug()
        ))
    })?;
    let tail = &rest[rest.find(['/', '?']).unwrap_or(rest.len())..];
    Ok(if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    })
}

/// Refuses URLs curl would not send byte for byte, or would not send over
/// HTTP at all.
fn check_url(url: &str) -> Result<(), ExportError> {
    let unrepresentable =
        |why: &str| ExportError::Unrepresentable(format!("the URL `{}` {why}", url.escape_debug()));
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("http" | "https")) {
        return Err(unrepresentable("is not an http:// or https:// URL"));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(unrepresentable(
            "holds spaces, controls or non-ASCII, which curl would reject or percent-encode",
        ));
    }
    if url.contains('#') {
        return Err(unrepresentable(
            "holds `#`, which curl would take for a fragment and not send",
        ));
    }
    Ok(())
}

/// `entries` as a HAR 1.2 log, oldest first as the format prefers.
///
/// How ferry's captures fit the format:
/// - Header values and cookies are text; bytes that are not UTF-8 become
///   U+FFFD. `queryString` holds each `name=value` pair form-decoded (`+`
///   is a space, `%XX` a byte), as browsers export it.
/// - `postData.text` is the body if it is UTF-8; otherwise it is the
///   body's base64, marked by `"_encoding": "base64"` (HAR 1.2 has
///   `encoding` only on response content) and a comment.
/// - `response.content.text` is the body with its content codings undone
///   (HAR's "HTTP decoded"), up to 16 MiB; `encoding` is `base64` when it
///   is not UTF-8; `compression` is the bytes the coding saved. A coding
///   ferry cannot decode leaves the body as sent. `bodySize` is the size
///   on the wire.
/// - Cuts and decode errors are said in the `comment` of the content or
///   the post data.
/// - A request that got no response has status 0 and its error in the
///   response's `_error` and the entry's comment, as browsers export
///   failed requests.
/// - Timings: the relay sees neither DNS nor connect, so those are -1;
///   `send` is 0 (it is part of `wait`, from the request's arrival to the
///   response's headers) and `receive` runs to the exchange's end. Unknown
///   spans are -1 and clock steps never give negative times; `time` is the
///   sum of the known ones.
/// - Ferry's own fields: `_ferry_id`, `_ferry_tunnel`, `_ferry_kind`,
///   `_ferry_outcome`, `_ferry_remote_addr` and, for a replay,
///   `_ferry_replay_of`.
pub fn har(entries: &[Exchange]) -> Value {
    let mut sorted: Vec<&Exchange> = entries.iter().collect();
    sorted.sort_by_key(|e| (e.received_at, e.id));
    json!({
        "log": {
            "version": "1.2",
            "creator": { "name": "ferry", "version": env!("CARGO_PKG_VERSION") },
            "entries": sorted.into_iter().map(har_entry).collect::<Vec<_>>(),
        }
    })
}

/// One HAR entry.
fn har_entry(exchange: &Exchange) -> Value {
    let span =
        |from: Micros, to: Option<Micros>| to.map_or(-1.0, |to| (to - from).max(0) as f64 / 1000.0);
    let (wait, receive) = match exchange.responded_at {
        Some(responded) => (
            span(exchange.received_at, Some(responded)),
            span(responded, exchange.done_at),
        ),
        None => (span(exchange.received_at, exchange.done_at), -1.0),
    };
    let time = wait.max(0.0) + receive.max(0.0);

    let mut comment = format!("ferry: {}", exchange.outcome.as_str());
    if let Some(error) = &exchange.error {
        comment.push_str(&format!("; {error}"));
    }
    if exchange.incomplete {
        comment.push_str("; part of the capture was lost");
    }
    let mut entry = json!({
        "startedDateTime": rfc3339_millis(exchange.received_at),
        "time": time,
        "request": har_request(exchange),
        "response": har_response(exchange),
        "cache": {},
        "timings": {
            "blocked": -1, "dns": -1, "connect": -1, "ssl": -1,
            "send": 0, "wait": wait, "receive": receive,
        },
        "comment": comment,
        "_ferry_id": exchange.id.to_string(),
        "_ferry_tunnel": exchange.tunnel,
        "_ferry_kind": exchange.kind.as_str(),
        "_ferry_outcome": exchange.outcome.as_str(),
        "_ferry_remote_addr": exchange.remote_addr,
    });
    if let Some(of) = exchange.replay_of {
        entry["_ferry_replay_of"] = of.to_string().into();
    }
    entry
}

/// A HAR request.
fn har_request(exchange: &Exchange) -> Value {
    let headers = &exchange.request_headers;
    let body = &exchange.request_body;
    let mut request = json!({
        "method": exchange.method,
        "url": exchange.url,
        "httpVersion": exchange.http_version,
        "cookies": request_cookies(headers),
        "headers": har_headers(headers),
        "queryString": query_string(&exchange.url),
        "headersSize": -1,
        "bodySize": body.size,
    });
    if body.size > 0 || !body.bytes.is_empty() {
        let mut post = Map::new();
        post.insert(
            "mimeType".into(),
            header_text(headers, "content-type").into(),
        );
        let mut notes = cut_note(body).into_iter().collect::<Vec<_>>();
        match crate::activity::decode::readable(&body.bytes) {
            Some(text) => {
                post.insert("text".into(), text.into());
            }
            None => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&body.bytes);
                post.insert("text".into(), encoded.into());
                post.insert("_encoding".into(), "base64".into());
                notes.push("the body is not readable text: text is its base64".into());
            }
        }
        if !notes.is_empty() {
            post.insert("comment".into(), notes.join("; ").into());
        }
        request["postData"] = post.into();
    }
    request
}

/// A HAR response; status 0 when none began.
fn har_response(exchange: &Exchange) -> Value {
    let Some(response) = &exchange.response else {
        let error = exchange
            .error
            .clone()
            .unwrap_or_else(|| exchange.outcome.as_str().to_owned());
        return json!({
            "status": 0,
            "statusText": "",
            "httpVersion": exchange.http_version,
            "cookies": [],
            "headers": [],
            "content": { "size": 0, "mimeType": "" },
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
            "_error": error,
        });
    };
    let headers = &response.headers;
    let reason = http::StatusCode::from_u16(response.status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("");
    json!({
        "status": response.status,
        "statusText": reason,
        "httpVersion": exchange.http_version,
        "cookies": response_cookies(headers),
        "headers": har_headers(headers),
        "content": har_content(headers, &response.body),
        "redirectURL": header_text(headers, "location"),
        "headersSize": -1,
        "bodySize": response.body.size,
    })
}

/// A response body as HAR content: decoded when ferry can decode it.
fn har_content(headers: &[Header], body: &CapturedBody) -> Value {
    let mut content = Map::new();
    let mut notes: Vec<String> = cut_note(body).into_iter().collect();
    let view = decode::decoded(headers, &body.bytes, HAR_DECODE_CAP);
    let (bytes, size): (&[u8], u64) = match &view {
        Some(view) if view.error.is_none() || !view.bytes.is_empty() => {
            let size = view.bytes.len() as u64;
            match &view.error {
                Some(error) => notes.push(format!("decoded as far as it goes: {error}")),
                None if view.truncated => notes.push(format!(
                    "the decoded body is longer than {HAR_DECODE_CAP} bytes: text is its beginning"
                )),
                None if !body.truncated => {
                    content.insert("compression".into(), size.saturating_sub(body.size).into());
                }
                None => {}
            }
            (&view.bytes, size)
        }
        Some(view) => {
            let error = view.error.as_deref().unwrap_or_default();
            notes.push(format!("not decoded: {error}; text is the body as sent"));
            (&body.bytes, body.size)
        }
        None => (&body.bytes, body.size),
    };
    content.insert("size".into(), size.into());
    content.insert(
        "mimeType".into(),
        header_text(headers, "content-type").into(),
    );
    if !bytes.is_empty() {
        match crate::activity::decode::readable(bytes) {
            Some(text) => {
                content.insert("text".into(), text.into());
            }
            None => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
                content.insert("text".into(), encoded.into());
                content.insert("encoding".into(), "base64".into());
            }
        }
    }
    if !notes.is_empty() {
        content.insert("comment".into(), notes.join("; ").into());
    }
    content.into()
}

/// The note for a body the capture limit cut, if it was.
fn cut_note(body: &CapturedBody) -> Option<String> {
    body.truncated.then(|| {
        format!(
            "the body was cut at {} of {} bytes by the capture limit",
            body.bytes.len(),
            body.size
        )
    })
}

/// Header fields as HAR name/value pairs, in order.
fn har_headers(headers: &[Header]) -> Vec<Value> {
    headers
        .iter()
        .map(|h| json!({ "name": h.name, "value": String::from_utf8_lossy(&h.value) }))
        .collect()
}

/// The first `name` field's value as text, or empty.
fn header_text(headers: &[Header], name: &str) -> String {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .unwrap_or_default()
}

/// The pairs of every `cookie` field.
fn request_cookies(headers: &[Header]) -> Vec<Value> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
        .flat_map(|h| {
            let text = String::from_utf8_lossy(&h.value).into_owned();
            text.split(';')
                .filter_map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    let name = name.trim();
                    (!name.is_empty()).then(|| json!({ "name": name, "value": value.trim() }))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The cookie each `set-cookie` field sets, with its path, domain and
/// flags (its expiry stays in the header: HAR wants ISO 8601 there).
fn response_cookies(headers: &[Header]) -> Vec<Value> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("set-cookie"))
        .filter_map(|h| {
            let text = String::from_utf8_lossy(&h.value).into_owned();
            let mut parts = text.split(';');
            let (name, value) = parts.next()?.split_once('=')?;
            let mut cookie = json!({
                "name": name.trim(),
                "value": value.trim(),
                "httpOnly": false,
                "secure": false,
            });
            for attribute in parts {
                let (key, value) = attribute.split_once('=').unwrap_or((attribute, ""));
                match key.trim().to_ascii_lowercase().as_str() {
                    "path" => cookie["path"] = value.trim().into(),
                    "domain" => cookie["domain"] = value.trim().into(),
                    "httponly" => cookie["httpOnly"] = true.into(),
                    "secure" => cookie["secure"] = true.into(),
                    _ => {}
                }
            }
            Some(cookie)
        })
        .collect()
}

/// The URL's query as form-decoded name/value pairs, in order.
fn query_string(url: &str) -> Vec<Value> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            json!({ "name": form_decode(name), "value": form_decode(value) })
        })
        .collect()
}

/// `text` with `+` as a space and each `%XX` as its byte; a `%` without two
/// hex digits stays as it is.
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    let hex = |at: usize| bytes.get(at).and_then(|&b| char::from(b).to_digit(16));
    while at < bytes.len() {
        match bytes[at] {
            b'+' => out.push(b' '),
            b'%' => {
                if let (Some(high), Some(low)) = (hex(at + 1), hex(at + 2)) {
                    out.push(u8::try_from(high * 16 + low).expect("two hex digits make a byte"));
                    at += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `micros` as RFC 3339 in UTC with milliseconds.
fn rfc3339_millis(micros: Micros) -> String {
    let since_epoch = Duration::from_micros(u64::try_from(micros).unwrap_or(0));
    humantime::format_rfc3339_millis(UNIX_EPOCH + since_epoch).to_string()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::Command;

    use bytes::Bytes;
    use ferry_common::ids::ExchangeId;
    use serde_json::json;

    use super::{curl, form_decode, har, printf_format, shell_quote, ExportError};
    use crate::store::{CapturedBody, CapturedResponse, Exchange, Header, Kind, Outcome};

    /// What `sh` prints for `printf ARGS`, where ARGS is shell text.
    fn sh_printf(args: &str) -> Vec<u8> {
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!("printf {args}"))
            .output()
            .expect("sh runs");
        assert!(output.status.success(), "{output:?}");
        output.stdout
    }

    fn header(name: &str, value: &[u8]) -> Header {
        Header {
            name: name.into(),
            value: value.to_vec(),
        }
    }

    fn body(bytes: &[u8]) -> CapturedBody {
        CapturedBody {
            bytes: Bytes::copy_from_slice(bytes),
            size: bytes.len() as u64,
            truncated: false,
        }
    }

    fn exchange(method: &str, url: &str, headers: Vec<Header>, request_body: &[u8]) -> Exchange {
        Exchange {
            id: ExchangeId::new(),
            tunnel: "brave-otter".into(),
            owner: String::new(),
            kind: Kind::Tunnel,
            replay_of: None,
            received_at: 1_700_000_000_123_456,
            method: method.into(),
            url: url.into(),
            http_version: "HTTP/1.1".into(),
            remote_addr: "203.0.113.9:51234".into(),
            request_headers: headers,
            request_body: body(request_body),
            response: None,
            responded_at: None,
            done_at: None,
            outcome: Outcome::Answered,
            error: None,
            incomplete: false,
            replayed_at: None,
            dispatch: None,
        }
    }

    const NASTY: [&str; 9] = [
        "it's",
        "say \"hi\"",
        "$(touch /tmp/ferry-never)",
        "`touch /tmp/ferry-never`",
        r"back\slash \n \\",
        "two\nlines\n",
        "'; rm -rf / #",
        "${HOME} $HOME %s %% %b",
        "",
    ];

    #[test]
    fn shell_quote_keeps_every_string_as_it_is() {
        for text in NASTY {
            assert_eq!(
                sh_printf(&format!("'%s' {}", shell_quote(text))),
                text.as_bytes(),
                "{text:?}"
            );
        }
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn printf_formats_print_back_every_byte() {
        let dash = b"-x: caf\xe9";
        assert_eq!(sh_printf(&shell_quote(&printf_format(dash))), dash);
        let all: Vec<u8> = (1..=255).collect();
        let format = printf_format(&all);
        assert!(format.is_ascii());
        assert!(
            !format.contains('!'),
            "no history expansion in double quotes"
        );
        assert_eq!(sh_printf(&shell_quote(&format)), all);
        for text in NASTY {
            let format = shell_quote(&printf_format(text.as_bytes()));
            assert_eq!(sh_printf(&format), text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn header_values_stay_inside_their_quotes() {
        for value in NASTY.iter().filter(|v| !v.contains('\n')) {
            let request = exchange(
                "GET",
                "http://a.test/",
                vec![header("x-nasty", value.as_bytes())],
                b"",
            );
            let command = curl(&request, None).expect("representable");
            let expected = if value.is_empty() {
                shell_quote("x-nasty;")
            } else {
                shell_quote(&format!("x-nasty: {value}"))
            };
            assert!(
                command.contains(&format!("-H {expected} \\\n")),
                "{command}"
            );
        }
    }

    #[test]
    fn the_command_turns_off_what_curl_would_add() {
        let request = exchange(
            "POST",
            "https://brave-otter.ferry.test/hook?x=1",
            vec![
                header("host", b"brave-otter.ferry.test"),
                header("content-length", b"2"),
                header("accept", b"*/*"),
            ],
            b"{}",
        );
        let command = curl(&request, None).expect("representable");
        assert_eq!(
            command,
            "curl --disable --globoff --path-as-is --http1.1 \\\n  \
             --request 'POST' \\\n  \
             'https://brave-otter.ferry.test/hook?x=1' \\\n  \
             -H 'host: brave-otter.ferry.test' \\\n  \
             -H 'accept: */*' \\\n  \
             -H 'User-Agent:' \\\n  \
             -H 'Content-Type:' \\\n  \
             -H 'Expect:' \\\n  \
             --data-raw '{}'\n"
        );
        // With a target, its own host goes instead of the captured one.
        let command = curl(&request, Some("http://localhost:3000/")).expect("representable");
        assert!(
            command.contains("'http://localhost:3000/hook?x=1'"),
            "{command}"
        );
        assert!(!command.contains("brave-otter"), "{command}");
    }

    #[test]
    fn get_head_and_empty_bodies() {
        let get = exchange("GET", "http://a.test/x", vec![], b"");
        let command = curl(&get, None).expect("representable");
        assert!(!command.contains("--request"), "{command}");
        assert!(!command.contains("--data"), "{command}");
        assert!(!command.contains("Content-Type:"), "{command}");

        let head = exchange("HEAD", "http://a.test/x", vec![], b"");
        let command = curl(&head, None).expect("representable");
        assert!(command.contains(" \\\n  --head \\\n"), "{command}");

        let put = exchange(
            "PUT",
            "http://a.test/x",
            vec![header("content-length", b"0")],
            b"",
        );
        let command = curl(&put, None).expect("representable");
        assert!(command.ends_with("--data-raw ''\n"), "{command}");

        let head_with_body = exchange("HEAD", "http://a.test/x", vec![], b"x");
        assert!(matches!(
            curl(&head_with_body, None),
            Err(ExportError::Unrepresentable(_))
        ));
    }

    #[test]
    fn bodies_that_are_not_plain_text_go_through_base64() {
        for bytes in [&b"a\0b"[..], b"\xff\xfe", b"line\r\n", b"\x1b]0;title\x07"] {
            let request = exchange("POST", "http://a.test/", vec![], bytes);
            let command = curl(&request, None).expect("representable");
            let (pipe, _) = command
                .split_once(" | base64 -d |\n  curl ")
                .expect("a pipe");
            let encoded = pipe.strip_prefix("printf '%s' ").expect("printf first");
            assert_eq!(sh_printf(&format!("'%s' {encoded} | base64 -d")), bytes);
            assert!(command.ends_with("--data-binary @-\n"), "{command}");
        }
        // Long text goes through printf rather than one huge argument.
        let long = "it's $(x) ".repeat(10_000);
        let request = exchange("POST", "http://a.test/", vec![], long.as_bytes());
        let command = curl(&request, None).expect("representable");
        assert!(
            command.starts_with("printf '%s' 'it'\\''s $(x) "),
            "{command:.40}"
        );
        assert!(command.ends_with("--data-binary @-\n"));
    }

    #[test]
    fn a_cut_body_gives_a_warning_line() {
        let mut request = exchange("POST", "http://a.test/", vec![], b"partial");
        request.request_body.size = 100;
        request.request_body.truncated = true;
        let command = curl(&request, None).expect("representable");
        assert!(
            command.starts_with(
                "# warning: the request body was cut at 7 of 100 bytes by the capture limit"
            ),
            "{command}"
        );
    }

    #[test]
    fn headers_that_are_not_text_are_spelled_with_printf() {
        let request = exchange(
            "GET",
            "http://a.test/",
            vec![header("x-b", b"caf\xe9 '%")],
            b"",
        );
        let command = curl(&request, None).expect("representable");
        assert!(
            command.contains(r#"-H "$(printf 'x-b: caf\351 '\''%%')""#),
            "{command}"
        );
    }

    #[test]
    fn what_curl_cannot_send_is_an_error() {
        let cases = [
            exchange(
                "GET",
                "http://a.test/",
                vec![header("x", b"a\r\nb: c")],
                b"",
            ),
            exchange("GET", "http://a.test/", vec![header("x", b"a\0")], b""),
            exchange("GET", "http://a.test/", vec![header("bad name", b"v")], b""),
            exchange("GET", "http://a.test/", vec![header("@file", b"v")], b""),
            exchange("GE T", "http://a.test/", vec![], b""),
            exchange("GET", "http://a.test/a b", vec![], b""),
            exchange("GET", "http://a.test/caf\u{e9}", vec![], b""),
            exchange("GET", "http://a.test/#frag", vec![], b""),
            exchange("GET", "file:///etc/passwd", vec![], b""),
        ];
        for request in cases {
            let result = curl(&request, None);
            assert!(
                matches!(result, Err(ExportError::Unrepresentable(_))),
                "{request:?}: {result:?}"
            );
        }
    }

    #[test]
    fn targets_are_bare_http_servers() {
        let request = exchange("GET", "https://a.test/p?q", vec![], b"");
        for (to, url) in [
            ("http://localhost:3000", "'http://localhost:3000/p?q'"),
            ("HTTPS://[::1]:8443/", "'https://[::1]:8443/p?q'"),
            ("http://app.test", "'http://app.test/p?q'"),
        ] {
            let command = curl(&request, Some(to)).expect("a valid target");
            assert!(command.contains(url), "{to}: {command}");
        }
        for to in [
            "localhost:3000",
            "ftp://a.test",
            "http://a.test/api",
            "http://a.test?x",
            "http://user:pw@a.test",
            "http://",
            "http://a.test:0",
            "http://a.test:99999",
            "http://a.test:",
            "http://a test",
            "http://a.test'$(x)",
        ] {
            let result = curl(&request, Some(to));
            assert!(
                matches!(result, Err(ExportError::InvalidTarget { .. })),
                "{to}: {result:?}"
            );
        }
        let error = curl(&request, Some("http://a.test/api")).expect_err("has a path");
        assert!(
            error.to_string().contains("http://localhost:3000"),
            "{error}"
        );
    }

    #[test]
    fn query_pairs_are_form_decoded() {
        assert_eq!(form_decode("a%20b+c%2B%zz%4"), "a b c+%zz%4");
        assert_eq!(form_decode("%E2%9C%93%ff"), "\u{2713}\u{fffd}");
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).expect("writes to memory");
        encoder.finish().expect("writes to memory")
    }

    #[test]
    fn har_entries_have_the_fields_the_format_requires() {
        let mut answered = exchange(
            "POST",
            "https://brave-otter.ferry.test/hook?filter[]=a%20b&a=1&a=2&flag",
            vec![
                header("host", b"brave-otter.ferry.test"),
                header("content-type", b"application/octet-stream"),
                header("cookie", b"session=abc; theme=dark"),
            ],
            b"\x00\xffbinary",
        );
        answered.received_at += 5_000_000;
        answered.responded_at = Some(answered.received_at + 12_500);
        answered.done_at = Some(answered.received_at + 20_000);
        let json = br#"{"ok":true}"#;
        answered.response = Some(CapturedResponse {
            status: 302,
            headers: vec![
                header("content-type", b"application/json"),
                header("content-encoding", b"gzip"),
                header("location", b"/next"),
                header("set-cookie", b"id=7; Path=/; HttpOnly; Secure"),
            ],
            body: body(&gzip(json)),
        });

        let mut failed = exchange("GET", "https://brave-otter.ferry.test/", vec![], b"");
        failed.outcome = Outcome::ClientOffline;
        failed.error = Some("the client is not connected".into());
        // A clock that stepped back gives no negative time.
        failed.done_at = Some(failed.received_at - 3_000);

        let log = har(&[answered.clone(), failed.clone()]);
        let log = &log["log"];
        assert_eq!(log["version"], "1.2");
        assert_eq!(log["creator"]["name"], "ferry");
        assert_eq!(log["creator"]["version"], env!("CARGO_PKG_VERSION"));
        let entries = log["entries"].as_array().expect("entries");
        assert_eq!(entries.len(), 2);
        // Oldest first.
        let (first, second) = (&entries[0], &entries[1]);
        assert_eq!(first["_ferry_id"], failed.id.to_string());

        let entry = second;
        assert_eq!(entry["startedDateTime"], "2023-11-14T22:13:25.123Z");
        assert_eq!(entry["time"], 20.0);
        assert_eq!(entry["timings"]["send"], 0);
        assert_eq!(entry["timings"]["wait"], 12.5);
        assert_eq!(entry["timings"]["receive"], 7.5);
        assert_eq!(entry["timings"]["dns"], -1);
        assert_eq!(entry["cache"], json!({}));
        assert_eq!(entry["_ferry_outcome"], "answered");
        assert_eq!(entry["comment"], "ferry: answered");

        let request = &entry["request"];
        assert_eq!(request["method"], "POST");
        assert_eq!(request["httpVersion"], "HTTP/1.1");
        assert_eq!(request["headersSize"], -1);
        assert_eq!(request["bodySize"], 8);
        assert_eq!(
            request["headers"][0],
            json!({"name": "host", "value": "brave-otter.ferry.test"})
        );
        assert_eq!(
            request["cookies"],
            json!([{"name": "session", "value": "abc"}, {"name": "theme", "value": "dark"}])
        );
        assert_eq!(
            request["queryString"],
            json!([
                {"name": "filter[]", "value": "a b"},
                {"name": "a", "value": "1"},
                {"name": "a", "value": "2"},
                {"name": "flag", "value": ""},
            ])
        );
        assert_eq!(request["postData"]["mimeType"], "application/octet-stream");
        assert_eq!(request["postData"]["text"], "AP9iaW5hcnk=");
        assert_eq!(request["postData"]["_encoding"], "base64");

        let response = &entry["response"];
        assert_eq!(response["status"], 302);
        assert_eq!(response["statusText"], "Found");
        assert_eq!(response["redirectURL"], "/next");
        assert_eq!(response["headersSize"], -1);
        let wire = gzip(json).len() as u64;
        assert_eq!(response["bodySize"], wire);
        assert_eq!(response["headers"].as_array().map(Vec::len), Some(4));
        assert_eq!(
            response["cookies"],
            json!([{"name": "id", "value": "7", "path": "/", "httpOnly": true, "secure": true}])
        );
        let content = &response["content"];
        assert_eq!(content["text"], r#"{"ok":true}"#);
        assert_eq!(content["size"], json.len());
        assert_eq!(content["mimeType"], "application/json");
        assert_eq!(
            content["compression"],
            (json.len() as u64).saturating_sub(wire)
        );
        assert!(content.get("encoding").is_none());

        let entry = first;
        assert_eq!(entry["response"]["status"], 0);
        assert_eq!(entry["response"]["_error"], "the client is not connected");
        assert_eq!(
            entry["comment"],
            "ferry: client_offline; the client is not connected"
        );
        assert_eq!(entry["timings"]["wait"], 0.0);
        assert_eq!(entry["timings"]["receive"], -1.0);
        assert_eq!(entry["time"], 0.0);
        assert!(entry["request"].get("postData").is_none());
    }

    #[test]
    fn har_content_keeps_bodies_it_cannot_decode_as_sent() {
        let mut request = exchange("GET", "http://a.test/", vec![], b"");
        request.response = Some(CapturedResponse {
            status: 200,
            headers: vec![header("content-encoding", b"gzip")],
            body: body(b"\xff this is not gzip at all"),
        });
        let log = har(&[request]);
        let content = &log["log"]["entries"][0]["response"]["content"];
        assert_eq!(content["encoding"], "base64");
        assert_eq!(content["text"], "/yB0aGlzIGlzIG5vdCBnemlwIGF0IGFsbA==");
        assert_eq!(content["size"], 25);
        let comment = content["comment"].as_str().expect("a comment");
        assert!(
            comment.starts_with("not decoded: the gzip data is corrupt"),
            "{comment}"
        );
    }
}
