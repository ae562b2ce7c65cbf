//! Header handling shared by both ends of the tunnel.

use http::header::{self, HeaderMap, HeaderName};

use crate::handshake::meta;

/// Headers that describe one connection rather than the message (RFC 9110
/// §7.6.1), besides those the `Connection` header itself lists.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Hop-by-hop headers that are not standard names in `http`, so not in
/// [`HOP_BY_HOP`].
const HOP_BY_HOP_OTHER: &[&str] = &["keep-alive", "proxy-connection"];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || HOP_BY_HOP_OTHER.contains(&name.as_str())
}

/// Removes hop-by-hop headers: `Connection`, every header it names, and the
/// fixed list above plus `Keep-Alive` and `Proxy-Connection`. `TE: trailers`
/// is end-to-end in meaning and kept.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, rather than a
    // lookup per hop-by-hop name, on every request and response.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let keeps_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|value| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in named.iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP_OTHER {
        headers.remove(*name);
    }
    if keeps_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// The size of a header list as HTTP/2 counts it (RFC 9113 §6.5.2): each
/// field's name and value plus 32, with the request pseudo-headers
/// (`:method`, `:scheme`, `:authority`, `:path`) counted as fields too.
pub fn header_list_size(pseudo: &[(&str, &str)], headers: &HeaderMap) -> usize {
    const FIELD_OVERHEAD: usize = 32;
    let pseudo: usize = pseudo
        .iter()
        .map(|(name, value)| name.len() + value.len() + FIELD_OVERHEAD)
        .sum();
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD_OVERHEAD)
        .sum();
    pseudo + fields
}

/// The header in which a webhook delivery names its event type: the
/// relay's dispatcher sets it for the receiver, so it passes where the
/// relay's other `ferry-*` headers are removed.
pub const EVENT_TYPE: &str = "ferry-event-type";

/// Removes every `ferry-*` header, so a public caller cannot forge the
/// metadata the relay adds.
pub fn remove_ferry_headers(headers: &mut HeaderMap) {
    remove_ferry_headers_but(headers, None);
}

/// Removes the `ferry-*` headers but [`EVENT_TYPE`], from a request only a
/// relay wrote (it removed its caller's): the relay's metadata goes, the
/// delivery's event type reaches the receiver.
pub fn remove_relay_headers(headers: &mut HeaderMap) {
    remove_ferry_headers_but(headers, Some(EVENT_TYPE));
}

fn remove_ferry_headers_but(headers: &mut HeaderMap, kept: Option<&str>) {
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(meta::PREFIX) && Some(name.as_str()) != kept)
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::{header_list_size, remove_ferry_headers, remove_hop_by_hop};

    #[test]
    fn header_lists_are_counted_as_http2_counts_them() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("22"));
        assert_eq!(header_list_size(&[], &headers), (3 + 1 + 32) + (3 + 2 + 32));
        assert_eq!(
            header_list_size(&[(":method", "GET")], &HeaderMap::new()),
            7 + 3 + 32
        );
    }

    #[test]
    fn strips_connection_and_what_it_names() {
        let mut headers = HeaderMap::new();
        headers.append(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        headers.append("connection", HeaderValue::from_static("close"));
        headers.append("x-secret", HeaderValue::from_static("1"));
        headers.append("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.append("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.append("te", HeaderValue::from_static("trailers"));
        headers.append("x-keep", HeaderValue::from_static("a"));
        headers.append("x-keep", HeaderValue::from_static("b"));
        remove_hop_by_hop(&mut headers);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep", "te"]);
        assert_eq!(headers.get_all("x-keep").iter().count(), 2);
    }

    #[test]
    fn strips_hop_by_hop_headers_that_come_without_connection() {
        for name in [
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "te",
            "transfer-encoding",
        ] {
            let mut headers = HeaderMap::new();
            headers.append(name, HeaderValue::from_static("x"));
            headers.append("x-keep", HeaderValue::from_static("a"));
            remove_hop_by_hop(&mut headers);
            let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-keep"], "{name}");
        }
        let mut end_to_end = HeaderMap::new();
        end_to_end.append("x-keep", HeaderValue::from_static("a"));
        end_to_end.append("content-type", HeaderValue::from_static("text/plain"));
        let before = end_to_end.clone();
        remove_hop_by_hop(&mut end_to_end);
        assert_eq!(end_to_end, before);
    }

    #[test]
    fn strips_forged_metadata() {
        let mut headers = HeaderMap::new();
        headers.append("ferry-client-ip", HeaderValue::from_static("6.6.6.6"));
        headers.append("ferry-anything", HeaderValue::from_static("x"));
        headers.append("ferryman", HeaderValue::from_static("kept"));
        headers.append(super::EVENT_TYPE, HeaderValue::from_static("a.b"));
        let mut from_a_relay = headers.clone();
        remove_ferry_headers(&mut headers);
        assert_eq!(headers.len(), 1);
        super::remove_relay_headers(&mut from_a_relay);
        let mut kept: Vec<&str> = from_a_relay.keys().map(|name| name.as_str()).collect();
        kept.sort_unstable();
        assert_eq!(kept, [super::EVENT_TYPE, "ferryman"]);
    }
}
