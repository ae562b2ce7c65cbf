//! The light framing's wire format, a prototype measured against HTTP/2.
//!
//! Each binary WebSocket message holds one or more frames back to back, each
//! `stream id: u32 | kind: u8 | length: u32 | payload`, big-endian. A head
//! (the HEADERS payload) is `last: u8` (1 when no body follows), then for a
//! request `method` and `path`, for a response `status: u16`, then
//! `count: u16` and each header as `name` and `value`; every string is
//! `u16` length-prefixed bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

/// Bytes before each frame's payload.
pub const HEADER_LEN: usize = 9;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request or response head opening that direction of the stream.
    Headers = 0,
    /// Body bytes, counted against the receiver's window.
    Data = 1,
    /// The sender's body is complete.
    End = 2,
    /// The stream is abandoned in both directions.
    Reset = 3,
    /// A `u32` of window credit given back to the sender.
    WindowUpdate = 4,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Headers,
            1 => Self::Data,
            2 => Self::End,
            3 => Self::Reset,
            4 => Self::WindowUpdate,
            _ => return None,
        })
    }
}

/// One frame of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The stream: odd ids are opened by the relay.
    pub stream: u32,
    /// What it carries.
    pub kind: Kind,
    /// The head, body bytes or credit.
    pub payload: Bytes,
}

impl Frame {
    /// Appends the frame to a message being built.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(HEADER_LEN + self.payload.len());
        out.put_u32(self.stream);
        out.put_u8(self.kind as u8);
        // Payloads are bounded well below 4 GiB by the message size.
        out.put_u32(self.payload.len() as u32);
        out.extend_from_slice(&self.payload);
    }
}

/// Why a message or head could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end inside a frame or a field.
    Truncated,
    /// A kind byte this version does not know.
    UnknownKind(u8),
    /// A method, header name or value, or status that is not valid HTTP.
    Malformed(&'static str),
}

/// Takes the next frame off the front of `message`; `None` when it is empty.
pub fn next_frame(message: &mut Bytes) -> Result<Option<Frame>, DecodeError> {
    if message.is_empty() {
        return Ok(None);
    }
    if message.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let stream = message.get_u32();
    let kind = message.get_u8();
    let kind = Kind::from_byte(kind).ok_or(DecodeError::UnknownKind(kind))?;
    let len = message.get_u32() as usize;
    if message.len() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(Some(Frame {
        stream,
        kind,
        payload: message.split_to(len),
    }))
}

/// A decoded head: the request line or status, and the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<L> {
    /// Whether no body follows.
    pub last: bool,
    /// `(method, path)` or the status.
    pub line: L,
    /// The header fields.
    pub headers: HeaderMap,
}

fn put_str(out: &mut BytesMut, bytes: &[u8]) {
    // Heads come from hyper, which bounds a header list well below 64 KiB
    // per field; a longer field is cut rather than misframed.
    let len = bytes.len().min(usize::from(u16::MAX));
    out.put_u16(len as u16);
    out.extend_from_slice(&bytes[..len]);
}

fn get_str(head: &mut Bytes) -> Result<Bytes, DecodeError> {
    if head.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    let len = usize::from(head.get_u16());
    if head.len() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(head.split_to(len))
}

fn put_headers(out: &mut BytesMut, headers: &HeaderMap) {
    out.put_u16(headers.len().min(usize::from(u16::MAX)) as u16);
    for (name, value) in headers.iter().take(usize::from(u16::MAX)) {
        put_str(out, name.as_str().as_bytes());
        put_str(out, value.as_bytes());
    }
}

fn get_headers(head: &mut Bytes) -> Result<HeaderMap, DecodeError> {
    if head.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    let count = usize::from(head.get_u16());
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let name = HeaderName::from_bytes(&get_str(head)?)
            .map_err(|_| DecodeError::Malformed("header name"))?;
        let value = HeaderValue::from_maybe_shared(get_str(head)?)
            .map_err(|_| DecodeError::Malformed("header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn get_last(head: &mut Bytes) -> Result<bool, DecodeError> {
    if head.is_empty() {
        return Err(DecodeError::Truncated);
    }
    Ok(head.get_u8() == 1)
}

/// A request head as a HEADERS payload.
pub fn encode_request(last: bool, method: &Method, path: &str, headers: &HeaderMap) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(u8::from(last));
    put_str(&mut out, method.as_str().as_bytes());
    put_str(&mut out, path.as_bytes());
    put_headers(&mut out, headers);
    out.freeze()
}

/// A HEADERS payload as a request head.
pub fn decode_request(mut head: Bytes) -> Result<Head<(Method, String)>, DecodeError> {
    let last = get_last(&mut head)?;
    let method =
        Method::from_bytes(&get_str(&mut head)?).map_err(|_| DecodeError::Malformed("method"))?;
    let path = String::from_utf8(get_str(&mut head)?.to_vec())
        .map_err(|_| DecodeError::Malformed("path"))?;
    let headers = get_headers(&mut head)?;
    Ok(Head {
        last,
        line: (method, path),
        headers,
    })
}

/// A response head as a HEADERS payload.
pub fn encode_response(last: bool, status: StatusCode, headers: &HeaderMap) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(u8::from(last));
    out.put_u16(status.as_u16());
    put_headers(&mut out, headers);
    out.freeze()
}

/// A HEADERS payload as a response head.
pub fn decode_response(mut head: Bytes) -> Result<Head<StatusCode>, DecodeError> {
    let last = get_last(&mut head)?;
    if head.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    let status =
        StatusCode::from_u16(head.get_u16()).map_err(|_| DecodeError::Malformed("status"))?;
    let headers = get_headers(&mut head)?;
    Ok(Head {
        last,
        line: status,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use hyper::header::HeaderMap;
    use hyper::{Method, StatusCode};

    use super::{
        decode_request, decode_response, encode_request, encode_response, next_frame, DecodeError,
        Frame, Kind,
    };

    #[test]
    fn frames_packed_in_one_message_come_apart_in_order() {
        let frames = [
            Frame {
                stream: 1,
                kind: Kind::Headers,
                payload: Bytes::from_static(b"head"),
            },
            Frame {
                stream: 3,
                kind: Kind::Data,
                payload: Bytes::from(vec![7u8; 70_000]),
            },
            Frame {
                stream: 1,
                kind: Kind::End,
                payload: Bytes::new(),
            },
        ];
        let mut message = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut message);
        }
        let mut message = message.freeze();
        for frame in &frames {
            assert_eq!(next_frame(&mut message), Ok(Some(frame.clone())));
        }
        assert_eq!(next_frame(&mut message), Ok(None));
    }

    #[test]
    fn a_cut_frame_or_unknown_kind_is_an_error_not_a_frame() {
        let mut message = BytesMut::new();
        Frame {
            stream: 1,
            kind: Kind::Data,
            payload: Bytes::from_static(b"0123456789"),
        }
        .encode(&mut message);
        let mut cut = message.clone().freeze().slice(..12);
        assert_eq!(next_frame(&mut cut), Err(DecodeError::Truncated));
        let mut unknown = message.freeze().to_vec();
        unknown[4] = 9;
        assert_eq!(
            next_frame(&mut Bytes::from(unknown)),
            Err(DecodeError::UnknownKind(9))
        );
    }

    #[test]
    fn heads_round_trip_with_repeated_headers() {
        let mut headers = HeaderMap::new();
        headers.append("accept", "text/plain".parse().unwrap());
        headers.append("x-many", "one".parse().unwrap());
        headers.append("x-many", "two".parse().unwrap());
        let request = decode_request(encode_request(true, &Method::PATCH, "/a?b=c", &headers));
        let request = request.unwrap();
        assert!(request.last);
        assert_eq!(request.line, (Method::PATCH, "/a?b=c".to_owned()));
        assert_eq!(request.headers, headers);
        let response = decode_response(encode_response(false, StatusCode::CREATED, &headers));
        let response = response.unwrap();
        assert!(!response.last);
        assert_eq!(response.line, StatusCode::CREATED);
        assert_eq!(response.headers, headers);
        let cut = encode_request(false, &Method::GET, "/", &headers);
        assert_eq!(
            decode_request(cut.slice(..cut.len() - 1)),
            Err(DecodeError::Truncated)
        );
    }
}
