//! What `ferry http` prints: the status block (relay, forwarding URL and
//! target, dashboard, session status, counters), then a line per request
//! and per session event; or, for machines, a JSON object per event.
//!
//! On a terminal the session status and counters are the bottom line,
//! redrawn in place (a carriage return and "erase line", no cursor moves
//! up) and clipped at the right margin, with the request lines scrolling
//! above it: this survives resizes,
//! scrollback and lines of other programs far better than redrawing a block
//! at the top. Elsewhere the output has no escape sequences at all.
//!
//! Everything a caller or the relay chose (paths, methods, messages) is
//! printed through [`escape`], so that it cannot drive the terminal.

use std::borrow::Cow;
use std::fmt::Write;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::counters::Counters;
use crate::forward::InFlight;
use crate::{Event, Exchange};

/// Carriage return and "erase the whole line": takes the bottom line away.
const ERASE_LINE: &str = "\r\x1b[2K";
/// Auto-wrap off, then on again: the bottom line is clipped at the right
/// margin rather than wrapped, since erasing it again takes one row only.
const NO_WRAP: &str = "\x1b[?7l";
const WRAP: &str = "\x1b[?7h";
/// Select Graphic Rendition sequences, for colours.
const RESET: &str = "\x1b[0m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";
const BOLD: &str = "\x1b[1m";

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// For people: the status block and a line per request.
    Text,
    /// A JSON object per line and event, for machines.
    Json,
}

/// How [`View`] prints, decided by `main` from the flags, the environment
/// and whether stdout is a terminal.
#[derive(Debug, Clone)]
pub struct Options {
    /// Text or JSON.
    pub format: Format,
    /// Whether text has colours.
    pub color: bool,
    /// Whether stdout is a terminal on which the bottom line may be
    /// redrawn.
    pub live: bool,
    /// The relay, as the status block names it.
    pub relay: String,
    /// A note on the relay, such as that it is reachable from this machine
    /// only.
    pub relay_note: Option<String>,
    /// The relay's dashboard.
    pub dashboard: Option<String>,
}

/// Where the tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Not connected yet.
    Connecting,
    /// Connected: requests are forwarded.
    Online,
    /// Waiting to connect again.
    Reconnecting,
    /// The link dropped, or the client is stopping.
    Offline,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Connecting => "connecting",
            Status::Online => "online",
            Status::Reconnecting => "reconnecting",
            Status::Offline => "offline",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Status::Online => GREEN,
            Status::Connecting | Status::Reconnecting => YELLOW,
            Status::Offline => RED,
        }
    }
}

/// Turns the tunnel's events into the text to print, keeping the counters.
pub struct View {
    /// How to print.
    options: Options,
    /// The finished requests.
    counters: Counters,
    /// The requests waiting for the local server.
    in_flight: InFlight,
    /// When the counters started.
    started: Instant,
    /// Where the tunnel stands.
    status: Status,
    /// Whether the status block has been printed (on the first connect).
    block_shown: bool,
    /// The bottom line on the terminal now, when live.
    bottom: Option<String>,
}

impl View {
    /// A view counting from `started`, reading the requests in flight from
    /// `in_flight`.
    pub fn new(options: Options, in_flight: InFlight, started: Instant) -> Self {
        Self {
            options,
            counters: Counters::new(),
            in_flight,
            started,
            status: Status::Connecting,
            block_shown: false,
            bottom: None,
        }
    }

    /// Whether the bottom line is redrawn, and so wants [`View::refresh`]
    /// now and then for the rate to move while nothing happens.
    pub fn is_live(&self) -> bool {
        self.options.live && self.options.format == Format::Text
    }

    /// The text for one event, or for `Err(missed)` events lost because
    /// the terminal fell behind. `now` and `wall` are the time it is.
    pub fn event(&mut self, event: Result<Event, u64>, now: Instant, wall: SystemTime) -> String {
        let since = now.saturating_duration_since(self.started);
        match &event {
            Ok(Event::Request(exchange)) => self.counters.record(since, exchange.elapsed),
            Err(missed) => self.counters.record_unseen(since, *missed),
            Ok(Event::Connected { .. }) => self.status = Status::Online,
            Ok(Event::Disconnected { .. } | Event::Stopping) => self.status = Status::Offline,
            Ok(Event::Reconnecting { .. }) => self.status = Status::Reconnecting,
            Ok(Event::Warning(_)) => {}
        }
        match self.options.format {
            Format::Json => {
                let mut line = self.json(&event, wall).to_string();
                line.push('\n');
                line
            }
            Format::Text => {
                let lines = self.text(&event, wall, now);
                self.framed(lines, now)
            }
        }
    }

    /// The bottom line again, when live and it changed (the rate decays
    /// while no request comes).
    pub fn refresh(&mut self, now: Instant) -> Option<String> {
        if !self.is_live() || self.bottom.is_none() {
            return None;
        }
        let bottom = self.bottom_line(now);
        if self.bottom.as_ref() == Some(&bottom) {
            return None;
        }
        self.bottom = Some(bottom.clone());
        Some(format!("{ERASE_LINE}{NO_WRAP}{bottom}{WRAP}"))
    }

    /// What to print last: the bottom line ended with a newline, so that
    /// the final counters stay and the shell's prompt starts on a line of
    /// its own.
    pub fn finish(&mut self, now: Instant) -> String {
        if self.bottom.take().is_none() {
            return String::new();
        }
        format!("{ERASE_LINE}{}\n", self.bottom_line(now))
    }

    /// The line saying that `lines` lines were dropped because stdout was
    /// not read.
    pub fn dropped_note(&self, lines: u64) -> String {
        match self.options.format {
            Format::Json => format!(
                "{}\n",
                json!({"event": "dropped", "time": rfc3339(SystemTime::now()), "lines": lines})
            ),
            Format::Text if self.is_live() => format!("{ERASE_LINE}… {lines} lines not shown\n"),
            Format::Text => format!("… {lines} lines not shown\n"),
        }
    }

    /// `lines` with, when live, the bottom line taken away before and
    /// drawn again after.
    fn framed(&mut self, lines: String, now: Instant) -> String {
        if !self.is_live() || !self.block_shown {
            return lines;
        }
        let bottom = self.bottom_line(now);
        let framed = format!("{ERASE_LINE}{lines}{NO_WRAP}{bottom}{WRAP}");
        self.bottom = Some(bottom);
        framed
    }

    fn text(&mut self, event: &Result<Event, u64>, wall: SystemTime, now: Instant) -> String {
        let mut out = String::new();
        let time = clock(wall);
        let _ = match event {
            Err(missed) => writeln!(out, "… {missed} requests not shown"),
            Ok(Event::Connected {
                public_url,
                target,
                reconnected: false,
            }) if !self.block_shown => {
                self.write_block(&mut out, public_url, target, now);
                self.block_shown = true;
                Ok(())
            }
            Ok(Event::Connected {
                public_url, target, ..
            }) => writeln!(
                out,
                "{time}  {}: {} -> {}",
                self.paint(GREEN, "reconnected"),
                escape(public_url),
                escape(target)
            ),
            Ok(Event::Disconnected { reason }) => writeln!(
                out,
                "{time}  {}: {}",
                self.paint(RED, "tunnel dropped"),
                escape(reason)
            ),
            Ok(Event::Reconnecting { delay }) => writeln!(
                out,
                "{time}  {} in {:.1} s",
                self.paint(YELLOW, "reconnecting"),
                delay.as_secs_f64()
            ),
            Ok(Event::Warning(warning)) => writeln!(
                out,
                "{time}  {}: {}",
                self.paint(YELLOW, "warning"),
                escape(warning)
            ),
            Ok(Event::Stopping) => {
                writeln!(out, "{time}  stopping: letting requests in flight finish")
            }
            Ok(Event::Request(exchange)) => self.write_request(&mut out, exchange),
        };
        out
    }

    fn write_block(&mut self, out: &mut String, public_url: &str, target: &str, now: Instant) {
        let _ = writeln!(
            out,
            "{}{:>width$}\n",
            self.paint(BOLD, "ferry"),
            "Ctrl-C to quit",
            width = 60
        );
        if !self.is_live() {
            let _ = writeln!(out, "{:<18}{}", "Session Status", self.status.word());
        }
        let note = self
            .options
            .relay_note
            .as_ref()
            .map(|note| format!(" ({note})"))
            .unwrap_or_default();
        let _ = writeln!(out, "{:<18}{}{note}", "Relay", escape(&self.options.relay));
        let _ = writeln!(
            out,
            "{:<18}{} -> {}",
            "Forwarding",
            escape(public_url),
            escape(target)
        );
        if let Some(dashboard) = &self.options.dashboard {
            let _ = writeln!(out, "{:<18}{}", "Dashboard", escape(dashboard));
        }
        if !self.is_live() {
            let _ = writeln!(out, "{:<18}{}", "Requests", self.counters_text(now));
        }
        out.push('\n');
    }

    fn write_request(&self, out: &mut String, exchange: &Exchange) -> std::fmt::Result {
        let color = match exchange.status {
            _ if exchange.error.is_some() => RED,
            200..=299 => GREEN,
            300..=399 => CYAN,
            400..=499 => YELLOW,
            500..=599 => RED,
            _ => "",
        };
        let note = exchange
            .error
            .as_deref()
            .map(|e| format!("  {}", self.paint(RED, &escape(e))))
            .unwrap_or_default();
        writeln!(
            out,
            "{}  {:<7} {:<40} {} {:>9}{note}",
            clock(exchange.received),
            escape(&exchange.method),
            escape(&exchange.path),
            self.paint(color, &exchange.status.to_string()),
            duration(exchange.elapsed),
        )
    }

    /// The session status and counters, the live bottom line.
    fn bottom_line(&mut self, now: Instant) -> String {
        let status = self.paint(self.status.color(), self.status.word());
        format!("{status}  {}", self.counters_text(now))
    }

    fn counters_text(&mut self, now: Instant) -> String {
        let rate = self
            .counters
            .rate(now.saturating_duration_since(self.started));
        let percentile = |fraction| {
            self.counters
                .percentile(fraction)
                .map_or_else(|| "-".to_owned(), duration)
        };
        format!(
            "total {}  open {}  rate {rate:.2}/s  p50 {}  p90 {}",
            self.counters.total(),
            self.in_flight.get(),
            percentile(0.5),
            percentile(0.9),
        )
    }

    fn json(&self, event: &Result<Event, u64>, wall: SystemTime) -> serde_json::Value {
        let time = rfc3339(wall);
        match event {
            Err(missed) => json!({"event": "dropped", "time": time, "requests": missed}),
            Ok(Event::Connected {
                public_url,
                target,
                reconnected,
            }) => json!({
                "event": "online",
                "time": time,
                "public_url": public_url,
                "target": target,
                "relay": self.options.relay,
                "dashboard_url": self.options.dashboard,
                "reconnected": reconnected,
            }),
            Ok(Event::Disconnected { reason }) => {
                json!({"event": "offline", "time": time, "reason": reason})
            }
            Ok(Event::Reconnecting { delay }) => json!({
                "event": "reconnecting",
                "time": time,
                "delay_ms": delay.as_millis(),
            }),
            Ok(Event::Stopping) => json!({"event": "stopping", "time": time}),
            Ok(Event::Warning(message)) => {
                json!({"event": "warning", "time": time, "message": message})
            }
            Ok(Event::Request(exchange)) => json!({
                "event": "request",
                "time": rfc3339(exchange.received),
                "id": exchange.id.map(|id| id.to_string()),
                "method": exchange.method,
                "path": exchange.path,
                "status": exchange.status,
                "duration_ms": exchange.elapsed.as_micros() as f64 / 1000.0,
                "error": exchange.error,
            }),
        }
    }

    /// `text` in `color`, when colours are on.
    fn paint<'a>(&self, color: &str, text: &'a str) -> Cow<'a, str> {
        if self.options.color && !color.is_empty() {
            Cow::Owned(format!("{color}{text}{RESET}"))
        } else {
            Cow::Borrowed(text)
        }
    }
}

/// Whether `c` reorders or hides what a terminal shows: bidirectional
/// marks, embeddings, overrides and isolates, zero-width characters, and
/// the Unicode line and paragraph separators.
pub fn reorders_or_hides(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}'
    )
}

/// `text` with its control characters (C0, DEL and C1, which include ESC
/// and CSI) written as `\xNN`, so that printing it cannot move the cursor,
/// change colours or set the window title, and characters that reorder or
/// hide text written as `\u{NNNN}`, so that a path cannot show the rest of
/// its line reversed.
pub fn escape(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() || reorders_or_hides(c);
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(escaped, "\\x{:02x}", u32::from(c));
        } else if reorders_or_hides(c) {
            let _ = write!(escaped, "\\u{{{:04x}}}", u32::from(c));
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

/// A duration as people read it: `3.8 ms`, `1.25 s`.
fn duration(elapsed: Duration) -> String {
    let millis = elapsed.as_secs_f64() * 1000.0;
    if millis < 1000.0 {
        format!("{millis:.1} ms")
    } else {
        format!("{:.2} s", elapsed.as_secs_f64())
    }
}

/// RFC 3339 in UTC to the millisecond.
fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// The time of day in UTC to the millisecond, as `ferry log` prints it:
/// written in place, since it starts every request's line.
struct Clock(SystemTime);

fn clock(at: SystemTime) -> Clock {
    Clock(at)
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let of_day = since.as_secs() % 86_400;
        write!(
            f,
            "{:02}:{:02}:{:02}.{:03}",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60,
            since.subsec_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use super::{escape, Format, Options, View};
    use crate::forward::InFlight;
    use crate::{Event, Exchange};

    fn options(format: Format, color: bool, live: bool) -> Options {
        Options {
            format,
            color,
            live,
            relay: "ws://127.0.0.1:8080".to_owned(),
            relay_note: Some("embedded".to_owned()),
            dashboard: Some("http://127.0.0.1:8080/".to_owned()),
        }
    }

    #[test]
    fn the_clock_is_the_time_of_day_of_the_rfc3339_form() {
        for millis in [
            0,
            999,
            1_700_000_000_123,
            1_764_374_399_999,
            4_102_444_800_001,
        ] {
            let at = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
            let full = super::rfc3339(at);
            assert_eq!(super::clock(at).to_string(), full[11..23], "{full}");
        }
    }

    fn request(path: &str, status: u16, error: Option<&str>) -> Event {
        Event::Request(Exchange {
            received: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            id: None,
            method: "POST".to_owned(),
            path: path.to_owned(),
            status,
            elapsed: Duration::from_micros(3800),
            error: error.map(str::to_owned),
        })
    }

    fn connected(reconnected: bool) -> Event {
        Event::Connected {
            public_url: "http://otter.localhost:8080".to_owned(),
            target: "http://localhost:3000".to_owned(),
            reconnected,
        }
    }

    /// Feeds `events` to a view and returns everything it printed.
    fn printed(options: Options, events: Vec<Result<Event, u64>>) -> String {
        let start = Instant::now();
        let mut view = View::new(options, InFlight::default(), start);
        let mut out = String::new();
        for (i, event) in events.into_iter().enumerate() {
            let now = start + Duration::from_secs(i as u64);
            out.push_str(&view.event(event, now, SystemTime::now()));
        }
        out.push_str(&view.finish(start + Duration::from_secs(100)));
        out
    }

    #[test]
    fn the_block_names_relay_forwarding_and_dashboard_then_a_line_per_request() {
        let out = printed(
            options(Format::Text, false, false),
            vec![Ok(connected(false)), Ok(request("/hook", 200, None))],
        );
        assert!(out.contains("Session Status    online\n"), "{out}");
        assert!(
            out.contains("Relay             ws://127.0.0.1:8080 (embedded)\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "Forwarding        http://otter.localhost:8080 -> http://localhost:3000\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("Dashboard         http://127.0.0.1:8080/\n"),
            "{out}"
        );
        assert!(
            out.contains("Requests          total 0  open 0  rate 0.00/s  p50 -  p90 -\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "22:13:20.123  POST    /hook                                    200    3.8 ms\n"
            ),
            "{out}"
        );
        assert!(!out.contains('\x1b'), "{out:?}");
    }

    #[test]
    fn statuses_are_coloured_by_class_when_colours_are_on() {
        let events = [
            (200, None, "\x1b[32m200\x1b[0m"),
            (302, None, "\x1b[36m302\x1b[0m"),
            (404, None, "\x1b[33m404\x1b[0m"),
            (503, None, "\x1b[31m503\x1b[0m"),
            (502, Some("unreachable"), "\x1b[31munreachable\x1b[0m"),
        ];
        for (status, error, painted) in events {
            let out = printed(
                options(Format::Text, true, false),
                vec![Ok(request("/x", status, error))],
            );
            assert!(out.contains(painted), "{status}: {out:?}");
        }
    }

    #[test]
    fn a_live_terminal_redraws_the_bottom_line_with_status_and_counters() {
        let out = printed(
            options(Format::Text, false, true),
            vec![
                Ok(connected(false)),
                Ok(request("/a", 200, None)),
                Ok(Event::Disconnected {
                    reason: "relay restarting".to_owned(),
                }),
                Ok(Event::Reconnecting {
                    delay: Duration::from_millis(1500),
                }),
                Ok(connected(true)),
            ],
        );
        assert!(!out.contains("Session Status"), "{out}");
        // The bottom line is drawn with auto-wrap off, so it never takes a
        // second row that erasing it would leave behind.
        assert!(out.contains("\x1b[?7lonline  total 0"), "{out:?}");
        assert!(out.contains("p90 -\x1b[?7h"), "{out:?}");
        let out = out.replace("\x1b[?7l", "").replace("\x1b[?7h", "");
        assert!(
            out.contains("\n\nonline  total 0  open 0  rate 0.00/s  p50 -  p90 -\r\x1b[2K")
                && out.contains("200    3.8 ms\nonline  total 1  open 0  rate 1.00/s  p50 3.8 ms  p90 3.8 ms\r\x1b[2K"),
            "{out:?}"
        );
        assert!(
            out.contains("\r\x1b[2K")
                && out.contains("tunnel dropped: relay restarting\noffline  total 1"),
            "{out:?}"
        );
        assert!(
            out.contains("reconnecting in 1.5 s\nreconnecting  total 1"),
            "{out:?}"
        );
        assert!(
            out.contains(
                "reconnected: http://otter.localhost:8080 -> http://localhost:3000\nonline  total 1"
            ),
            "{out:?}"
        );
        // The last bottom line stays, ended.
        assert!(
            out.ends_with(
                "\r\x1b[2Konline  total 1  open 0  rate 0.00/s  p50 3.8 ms  p90 3.8 ms\n"
            ),
            "{out:?}"
        );
    }

    #[test]
    fn reconnects_are_printed_as_they_happen_without_a_terminal() {
        let out = printed(
            options(Format::Text, false, false),
            vec![
                Ok(connected(false)),
                Ok(Event::Disconnected {
                    reason: "the connection to the relay was lost".to_owned(),
                }),
                Ok(Event::Reconnecting {
                    delay: Duration::from_millis(200),
                }),
                Ok(connected(true)),
                Ok(Event::Stopping),
            ],
        );
        let lines: Vec<&str> = out.lines().skip_while(|l| !l.is_empty()).collect();
        let events: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.split_once("  ").map(|(_, rest)| rest))
            .collect();
        assert!(
            events.ends_with(&[
                "tunnel dropped: the connection to the relay was lost",
                "reconnecting in 0.2 s",
                "reconnected: http://otter.localhost:8080 -> http://localhost:3000",
                "stopping: letting requests in flight finish",
            ]),
            "{out}"
        );
        assert!(!out.contains('\x1b'), "{out:?}");
    }

    #[test]
    fn json_is_an_object_per_line_and_event() {
        let out = printed(
            options(Format::Json, true, true),
            vec![
                Ok(connected(false)),
                Ok(request("/hook?a=1", 404, None)),
                Ok(Event::Disconnected {
                    reason: "gone".to_owned(),
                }),
                Ok(Event::Reconnecting {
                    delay: Duration::from_millis(250),
                }),
                Err(3),
            ],
        );
        let events: Vec<serde_json::Value> = out
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(events.len(), 5, "{out}");
        assert_eq!(events[0]["event"], "online");
        assert_eq!(events[0]["public_url"], "http://otter.localhost:8080");
        assert_eq!(events[0]["dashboard_url"], "http://127.0.0.1:8080/");
        assert_eq!(events[1]["event"], "request");
        assert_eq!(events[1]["method"], "POST");
        assert_eq!(events[1]["path"], "/hook?a=1");
        assert_eq!(events[1]["status"], 404);
        assert_eq!(events[1]["duration_ms"], 3.8);
        assert_eq!(events[1]["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(events[2]["event"], "offline");
        assert_eq!(events[3]["event"], "reconnecting");
        assert_eq!(events[3]["delay_ms"], 250);
        assert_eq!(events[4]["event"], "dropped");
        assert!(!out.contains('\x1b'), "{out:?}");
    }

    #[test]
    fn control_characters_in_paths_are_escaped() {
        assert_eq!(escape("/plain/ü?q=1"), "/plain/ü?q=1");
        assert_eq!(
            escape("/bidi-\u{202e}exe.fdp/\u{2066}x\u{2069}\u{200b}\u{2028}\u{feff}"),
            "/bidi-\\u{202e}exe.fdp/\\u{2066}x\\u{2069}\\u{200b}\\u{2028}\\u{feff}"
        );
        assert_eq!(
            escape("/a\x1b[2J\x1b]0;owned\x07\r\n\u{9b}31m\x7f"),
            "/a\\x1b[2J\\x1b]0;owned\\x07\\x0d\\x0a\\x9b31m\\x7f"
        );
        let out = printed(
            options(Format::Text, true, true),
            vec![
                Ok(connected(false)),
                Ok(request("/x\x1b[2J\u{9b}1m", 200, Some("bad\x1b]0;t\x07"))),
                Ok(Event::Warning("w\x1bc".to_owned())),
            ],
        );
        assert!(out.contains("/x\\x1b[2J\\x9b1m"), "{out:?}");
        assert!(out.contains("bad\\x1b]0;t\\x07"), "{out:?}");
        assert!(out.contains("w\\x1bc"), "{out:?}");
        assert!(!out.contains('\u{9b}') && !out.contains('\x07'), "{out:?}");
        // The only escapes left are ours: colours and "erase line".
        for sequence in out.split('\x1b').skip(1) {
            assert!(
                sequence.starts_with("[2K")
                    || sequence.starts_with("[?7")
                    || sequence.starts_with("[0m")
                    || sequence.starts_with("[1m")
                    || sequence.starts_with("[3"),
                "{sequence:?} in {out:?}"
            );
        }
    }
}
