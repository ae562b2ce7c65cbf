//! Load generators: `wrk` where installed, and a built-in one for what
//! `wrk` cannot do (uploads and downloads) or where it is missing.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// What to load.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The Host header (the tunnel's host, or the origin's).
    pub host: String,
    /// The request path.
    pub path: String,
    /// Concurrent connections.
    pub connections: usize,
    /// How long to run.
    pub duration: Duration,
    /// A new connection per request (`Connection: close`).
    pub close: bool,
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Successful requests.
    pub requests: u64,
    /// Failed requests (errors and non-2xx).
    pub errors: u64,
    /// Requests per second.
    pub rps: f64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
}

/// Runs the built-in generator: `connections` tasks, each sending requests
/// back to back for `duration`.
pub async fn builtin(spec: &Spec) -> Outcome {
    let deadline = Instant::now() + spec.duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..spec.connections)
        .map(|_| {
            let spec = spec.clone();
            tokio::spawn(async move { worker(&spec, deadline).await })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok((mut l, e)) = task.await {
            latencies.append(&mut l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Outcome {
        requests: latencies.len() as u64,
        errors,
        rps: latencies.len() as f64 / elapsed,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index])
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn open(addr: SocketAddr) -> Option<Sender> {
    let stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// One connection's loop; returns latencies in microseconds and errors.
async fn worker(spec: &Spec, deadline: Instant) -> (Vec<u32>, u64) {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0u64;
    let mut sender: Option<Sender> = None;
    while Instant::now() < deadline {
        let started = Instant::now();
        if sender.is_none() {
            sender = open(spec.addr).await;
        }
        let Some(current) = sender.as_mut() else {
            errors += 1;
            continue;
        };
        let mut request = Request::builder()
            .uri(spec.path.as_str())
            .header("host", spec.host.as_str());
        if spec.close {
            request = request.header("connection", "close");
        }
        let Ok(request) = request.body(Empty::new()) else {
            return (latencies, errors + 1);
        };
        let ok = match current.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                response.into_body().collect().await.is_ok() && status.is_success()
            }
            Err(_) => false,
        };
        if ok {
            latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        } else {
            errors += 1;
        }
        if spec.close || !ok {
            sender = None;
        }
    }
    (latencies, errors)
}

/// Runs `wrk` for `spec`, pinned to `cpu` where given, or `None` when it
/// is not installed.
pub fn wrk(spec: &Spec, cpu: Option<usize>) -> Option<Outcome> {
    let threads = spec.connections.min(2).to_string();
    let mut command = match cpu {
        Some(cpu) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &cpu.to_string(), "wrk"]);
            taskset
        }
        None => Command::new("wrk"),
    };
    command
        .args(["-t", &threads, "-c", &spec.connections.to_string()])
        .args(["-d", &format!("{}s", spec.duration.as_secs().max(1))])
        .args(["--latency", "-H", &format!("Host: {}", spec.host)]);
    if spec.close {
        command.args(["-H", "Connection: close"]);
    }
    let output = command
        .arg(format!("http://{}{}", spec.addr, spec.path))
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    parse_wrk(&String::from_utf8_lossy(&output.stdout))
}

/// Reads requests/s, the 50% and 99% latencies, and errors from wrk's report.
fn parse_wrk(report: &str) -> Option<Outcome> {
    let mut outcome = Outcome {
        requests: 0,
        errors: 0,
        rps: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
    };
    for line in report.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", rps] => outcome.rps = rps.parse().ok()?,
            ["50%", latency] => outcome.p50_us = micros(latency)?,
            ["99%", latency] => outcome.p99_us = micros(latency)?,
            [requests, "requests", "in", ..] => outcome.requests = requests.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => outcome.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                outcome.errors += rest
                    .iter()
                    .filter_map(|f| f.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    (outcome.rps > 0.0).then_some(outcome)
}

fn micros(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number,
        "ms" => number * 1e3,
        "s" => number * 1e6,
        "m" => number * 60e6,
        _ => return None,
    })
}

/// What one transfer measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds from request to the end of the response.
    pub secs: f64,
}

/// Uploads `bytes` to `/upload` (or downloads them from `/download`).
pub async fn transfer(
    addr: SocketAddr,
    host: &str,
    bytes: u64,
    upload: bool,
) -> Result<Transfer, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![0xA5u8; CHUNK as usize]);
    let request = if upload {
        let stream = futures_util::stream::iter(0..bytes.div_ceil(CHUNK)).map(move |i| {
            let len = (bytes - i * CHUNK).min(CHUNK) as usize;
            Ok(Frame::data(chunk.slice(..len)))
        });
        Request::builder()
            .method(Method::POST)
            .uri("/upload")
            .header("host", host)
            .header("content-length", bytes)
            .body(StreamBody::new(stream).boxed_unsync())
    } else {
        Request::builder()
            .uri(format!("/download?bytes={bytes}"))
            .header("host", host)
            .body(Empty::new().boxed_unsync())
    }
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response
            .into_body()
            .collect()
            .await
            .map(|body| String::from_utf8_lossy(&body.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(format!("status {status}: {text}"));
    }
    let mut body = response.into_body();
    let (mut received, mut answer) = (0u64, Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            received += data.len() as u64;
            // An upload's answer is the count the origin received.
            if upload {
                answer.extend_from_slice(data);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if upload {
        let answer = String::from_utf8_lossy(&answer);
        let stored: u64 = answer.trim().parse().map_err(|_| {
            format!("the origin answered the upload with {answer:?}, not a byte count")
        })?;
        if stored != bytes {
            return Err(format!("the origin received {stored} of {bytes} bytes"));
        }
    } else if received != bytes {
        return Err(format!("downloaded {received} of {bytes} bytes"));
    }
    Ok(Transfer { bytes, secs })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::{micros, parse_wrk, transfer};

    #[tokio::test]
    async fn an_upload_counts_only_if_the_origin_got_every_byte() {
        const SENT: u64 = 1 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let origin = tokio::spawn(crate::origin::serve(listener));
        let whole = transfer(addr, "origin", SENT, true).await;
        assert_eq!(whole.map(|t| t.bytes), Ok(SENT));
        origin.abort();

        // An origin that says it got 100 bytes, whatever was sent.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let origin = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (mut head, mut buf) = (Vec::new(), [0u8; 4096]);
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n100")
                .await
                .unwrap();
            // Takes the rest of the upload until the client hangs up.
            while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let short = transfer(addr, "origin", SENT, true).await;
        assert_eq!(
            short.map(|t| t.bytes),
            Err(format!("the origin received 100 of {SENT} bytes"))
        );
        origin.await.unwrap();
    }

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 10s test @ http://127.0.0.1:8080/1k
  2 threads and 64 connections
  Latency Distribution
     50%  512.00us
     75%    1.10ms
     90%    2.00ms
     99%    3.25ms
  812345 requests in 10.00s, 900.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  81234.50
Transfer/sec:     90.00MB
";
        let outcome = parse_wrk(report).unwrap();
        assert_eq!(outcome.requests, 812_345);
        assert_eq!(outcome.rps, 81_234.5);
        assert_eq!(outcome.p50_us, 512.0);
        assert_eq!(outcome.p99_us, 3250.0);
        assert_eq!(outcome.errors, 3);
        assert_eq!(micros("1.5s"), Some(1.5e6));
    }
}
