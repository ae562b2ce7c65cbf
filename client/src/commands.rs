//! The log commands: `ferry log`, `show`, `replay` and `export`, printing
//! for people (or JSON with `--json`).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine;
use ferry::activity::{LocalReplay, Source};
use ferry::Target;
use ferry_common::api::{BodyView, HeaderField, ReplayRequest, RequestItem};
use http_body_util::BodyExt;

use crate::{ExportArgs, LogArgs, ReplayArgs, ShowArgs};

/// How often a local `--follow` looks for new entries when no relay runs
/// to push them.
const LOCAL_FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// The most body bytes `ferry show` prints of a body.
const SHOWN_BODY: usize = 64 * 1024;

/// Text from a capture made safe for a terminal: control characters (but
/// newlines and tabs), C1 controls and bidirectional overrides are shown
/// escaped, so a body cannot retitle the window, clear the screen, write
/// the clipboard or reorder what is shown.
pub fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if (c.is_control() && c != '\n' && c != '\t') || ferry::terminal::reorders_or_hides(c) {
            let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

fn line(item: &RequestItem) -> String {
    let time = item.received_at.get(11..23).unwrap_or(&item.received_at);
    let status = item.status.map_or("---".to_owned(), |s| s.to_string());
    let duration = item
        .duration_ms
        .map_or(String::new(), |ms| format!("{ms}ms"));
    let mut text = format!(
        "{time}  {:<20} {:<6} {:<7} {status:<4} {duration:>7} {:>8}  {}  {}",
        item.tunnel,
        item.kind,
        item.method,
        bytesize(item.request_size + item.response_size),
        item.path,
        item.id
    );
    if item.outcome != "answered" {
        let _ = write!(text, "  ({})", item.outcome.replace('_', " "));
    }
    text
}

fn bytesize(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes}B"),
        1024..1_048_576 => format!("{:.1}KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1}MiB", bytes as f64 / 1_048_576.0),
    }
}

fn print_item(item: &RequestItem, json: bool) {
    if json {
        println!("{}", serde_json::to_string(item).unwrap_or_default());
    } else {
        println!("{}", inert(&line(item)));
    }
}

/// `ferry log`.
pub async fn log(args: LogArgs) -> Result<(), String> {
    let source = args.source.open(false)?;
    let query = args.query();
    let limit = args.limit.clamp(1, 500);
    let separator = if query.is_empty() { "" } else { "&" };
    // A followed log starts its tail before it reads the page, so that an
    // entry committed in between is not lost; one in both is printed once.
    let tail = match (&source, args.follow) {
        (_, false) => None,
        (Source::Api { .. }, true) => Some(Tail::Stream(
            source.stream(&query).await.map_err(|err| err.to_string())?,
        )),
        (Source::Local(_), true) => Some(Tail::Seq(
            source
                .local_last_seq()
                .await
                .map_err(|err| err.to_string())?,
        )),
    };
    let page = source
        .list(&format!("{query}{separator}limit={limit}"))
        .await
        .map_err(|err| err.to_string())?;
    // Oldest at the top, so that a followed log reads downwards.
    for item in page.items.iter().rev() {
        print_item(item, args.json);
    }
    let printed: HashSet<String> = page.items.into_iter().map(|item| item.id).collect();
    let print_new = |item: &RequestItem| {
        if !printed.contains(&item.id) {
            print_item(item, args.json);
        }
    };
    match tail {
        None => Ok(()),
        Some(Tail::Stream(mut stream)) => {
            let mut buffer = Vec::new();
            while let Some(frame) = stream.frame().await {
                let frame = frame.map_err(|err| format!("the live tail ended: {err}"))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buffer.extend_from_slice(&data);
                while let Some(at) = buffer.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = buffer.drain(..at + 2).collect();
                    let block = String::from_utf8_lossy(&block);
                    for data in block.lines().filter_map(|l| l.strip_prefix("data: ")) {
                        if let Ok(item) = serde_json::from_str::<RequestItem>(data) {
                            print_new(&item);
                        }
                    }
                }
            }
            Err("the relay ended the live tail".to_owned())
        }
        Some(Tail::Seq(mut seq)) => loop {
            let (items, next) = source
                .local_after(&query, seq)
                .await
                .map_err(|err| err.to_string())?;
            seq = next;
            for item in &items {
                print_new(item);
            }
            tokio::time::sleep(LOCAL_FOLLOW_EVERY).await;
        },
    }
}

/// Where a followed log reads new entries.
enum Tail {
    /// The relay's live tail.
    Stream(hyper::body::Incoming),
    /// The database, after this commit position.
    Seq(i64),
}

fn print_headers(out: &mut String, headers: &[HeaderField]) {
    for field in headers {
        let _ = writeln!(out, "{}: {}", field.name, field.value);
    }
}

/// A body for the terminal: JSON pretty-printed, text as is, anything
/// else as a hex dump.
fn print_body(out: &mut String, body: &BodyView) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (bytes, note) = match &body.decoded {
        Some(decoded) => (
            match (&decoded.text, &decoded.base64) {
                (Some(text), _) => text.clone().into_bytes(),
                (None, Some(encoded)) => b64.decode(encoded).unwrap_or_default(),
                (None, None) => Vec::new(),
            },
            " (decoded from its content-encoding)",
        ),
        None => (b64.decode(&body.base64).unwrap_or_default(), ""),
    };
    if bytes.is_empty() {
        return;
    }
    out.push('\n');
    let cut = bytes.len() > SHOWN_BODY;
    let shown = &bytes[..bytes.len().min(SHOWN_BODY)];
    // Pretty JSON only for a body shown whole: the part of one is not JSON.
    let json = (!cut)
        .then(|| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .flatten();
    let printed = if let Some(json) = json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
        bytes.len()
    } else if let Some(text) = text_prefix(shown, cut) {
        let _ = writeln!(out, "{text}");
        text.len()
    } else {
        for (row, chunk) in shown.chunks(16).enumerate() {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            let ascii: String = chunk
                .iter()
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        char::from(b)
                    } else {
                        '.'
                    }
                })
                .collect();
            let _ = writeln!(out, "{:08x}  {:<47}  {ascii}", row * 16, hex.join(" "));
        }
        shown.len()
    };
    if bytes.len() > printed {
        let _ = writeln!(
            out,
            "… {} more bytes (ferry export --har, or the /body download)",
            bytes.len() - printed
        );
    }
    if body.truncated {
        let _ = writeln!(
            out,
            "[the log kept {} of {} bytes{note}]",
            body.captured, body.size
        );
    } else if !note.is_empty() {
        let _ = writeln!(out, "[{} bytes as sent{note}]", body.size);
    }
}

/// `shown` as text when it is UTF-8; when it was `cut` from a longer body,
/// up to the character the cut split.
fn text_prefix(shown: &[u8], cut: bool) -> Option<&str> {
    match std::str::from_utf8(shown) {
        Ok(text) => Some(text),
        // No error length: the bytes end inside a character.
        Err(err) if cut && err.error_len().is_none() => {
            std::str::from_utf8(&shown[..err.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

/// `ferry show`.
pub async fn show(args: ShowArgs) -> Result<(), String> {
    let source = args.source.open(false)?;
    let detail = source
        .detail(&args.id)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&detail).unwrap_or_default()
        );
        return Ok(());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} {}",
        detail.request.method, detail.request.url, detail.request.http_version
    );
    let _ = writeln!(
        out,
        "# {} · {} · from {} · {}",
        detail.item.id,
        detail.item.received_at,
        detail.remote_addr,
        detail.item.outcome.replace('_', " ")
    );
    if let Some(of) = &detail.item.replay_of {
        let _ = writeln!(out, "# replay of {of}");
    }
    print_headers(&mut out, &detail.request.headers);
    print_body(&mut out, &detail.request.body);
    out.push('\n');
    match &detail.response {
        Some(response) => {
            let duration = detail
                .item
                .duration_ms
                .map_or(String::new(), |ms| format!(" in {ms} ms"));
            let _ = writeln!(out, "← {}{duration}", response.status);
            print_headers(&mut out, &response.headers);
            print_body(&mut out, &response.body);
        }
        None => {
            let _ = writeln!(out, "← no response");
        }
    }
    if let Some(error) = &detail.error {
        let _ = writeln!(out, "error: {error}");
    }
    print!("{}", inert(&out));
    Ok(())
}

fn edits(args: &ReplayArgs) -> Result<ReplayRequest, String> {
    let mut headers = std::collections::BTreeMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("--header `{header}` is not `Name: value`"))?;
        headers.insert(
            name.trim().to_ascii_lowercase(),
            Some(value.trim().to_owned()),
        );
    }
    for name in &args.remove_headers {
        headers.insert(name.trim().to_ascii_lowercase(), None);
    }
    let (body, body_base64) = match &args.body {
        Some(body) => match body.strip_prefix('@') {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|err| format!("cannot read --body @{path}: {err}"))?;
                (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                )
            }
            None => (Some(body.clone()), None),
        },
        None => (None, None),
    };
    Ok(ReplayRequest {
        target: None,
        method: args.method.clone(),
        path: args.path.clone(),
        headers: (!headers.is_empty()).then_some(headers),
        body,
        body_base64,
    })
}

fn print_replay(replay: &LocalReplay) {
    println!(
        "{} → {} in {} ms ({})",
        replay.request_line,
        replay.status,
        replay.elapsed.as_millis(),
        replay.id
    );
    let body = String::from_utf8_lossy(&replay.body[..replay.body.len().min(SHOWN_BODY)]);
    if !body.trim().is_empty() {
        println!("{}", inert(body.trim_end()));
    }
}

/// `ferry replay`.
pub async fn replay(args: ReplayArgs) -> Result<(), String> {
    let source = args.source.open(args.missed)?;
    let edits = edits(&args)?;
    let target = |tunnel_target: Option<String>| -> Result<Target, String> {
        let text = args
            .to
            .clone()
            .or(tunnel_target)
            .unwrap_or_else(|| "http://localhost:3000".to_owned());
        Target::parse(&text).map_err(|err| err.to_string())
    };
    if args.missed {
        let target = target(match &args.tunnel {
            Some(tunnel) => source.tunnel_target(tunnel).await,
            None => None,
        })?;
        let replayed = ferry::activity::replay_missed(&source, args.tunnel.as_deref(), &target)
            .await
            .map_err(|err| err.to_string())?;
        if replayed.is_empty() {
            println!("nothing missed: every request captured while offline was replayed already");
        }
        for replay in &replayed {
            print_replay(replay);
        }
        return Ok(());
    }
    let id = args
        .id
        .clone()
        .ok_or("give the id of the request to replay")?;
    if args.via_relay {
        let mut edits = edits;
        edits.target = args.to.clone();
        let answer = source
            .replay_via_relay(&id, &edits)
            .await
            .map_err(|err| err.to_string())?;
        println!(
            "replayed through the relay: {} ({}), logged as {}",
            answer
                .status
                .map_or("no response".to_owned(), |s| s.to_string()),
            answer.outcome.replace('_', " "),
            answer.id
        );
        return Ok(());
    }
    let detail = source.detail(&id).await.map_err(|err| err.to_string())?;
    let target = target(source.tunnel_target(&detail.item.tunnel).await)?;
    let replay = ferry::activity::replay_local(&source, &id, &edits, &target)
        .await
        .map_err(|err| err.to_string())?;
    print_replay(&replay);
    Ok(())
}

/// `ferry export`.
pub async fn export(args: ExportArgs) -> Result<(), String> {
    let source = args.source.open(false)?;
    if args.har {
        let har = source.har(&args.ids).await.map_err(|err| err.to_string())?;
        println!("{}", serde_json::to_string_pretty(&har).unwrap_or_default());
        return Ok(());
    }
    for id in &args.ids {
        let command = source
            .curl(id, args.to.as_deref())
            .await
            .map_err(|err| err.to_string())?;
        println!("{}", command.trim_end());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::inert;

    #[test]
    fn terminal_controls_from_a_capture_are_shown_escaped() {
        let hostile = "hello \u{1b}]0;PWNED\u{7}\u{1b}[2J\u{9b}31m\u{202e}txt.exe\nnext\tline";
        let shown = inert(hostile);
        assert!(!shown
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'));
        assert!(!shown.contains('\u{202e}'));
        assert!(shown.contains("\\u{001b}]0;PWNED"), "{shown}");
        assert!(shown.contains("\nnext\tline"));
    }
}
