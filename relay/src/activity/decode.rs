//! The decoded view of a body sent with a `content-encoding`: gzip,
//! deflate and brotli, read as a stream and cut at a cap, so that a
//! decompression bomb costs a flag rather than memory.

use std::io::{self, Read};

use flate2::{Decompress, FlushDecompress, Status};

use crate::store::Header;

/// More codings than this on one body is an attack or a bug, not a server.
const MAX_CODINGS: usize = 4;
/// How much compressed input each inflate layer reads at a time.
const INPUT_CHUNK: usize = 16 * 1024;

/// A body with its content codings undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The decoded bytes, at most the cap.
    pub bytes: Vec<u8>,
    /// The decoded body goes on past the cap; `bytes` is its beginning.
    pub truncated: bool,
    /// Why decoding stopped early: corrupt data, or a body that ends before
    /// its compressed stream does (as one cut by the capture limit does).
    /// `bytes` holds what was decoded before it.
    pub error: Option<String>,
}

/// One content coding we can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
    Brotli,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
        }
    }
}

/// `body` with the codings its `content-encoding` fields list undone, last
/// applied first, keeping at most `cap` decoded bytes.
///
/// `None` when there is nothing to decode (no coding but `identity`, or an
/// empty body, as a HEAD or 304 response has) or when a coding is not one
/// we know (`gzip`, `x-gzip`, `deflate`, `br`), since then no view can be
/// right. `deflate` is zlib-wrapped as RFC 9110 says, and raw deflate when
/// the first bytes are no zlib header, as some servers send it. Trailing
/// bytes after a finished stream are ignored, as browsers do.
///
/// Memory stays near `cap`: the output never grows past it, and each
/// decoder holds only its window (32 KiB for deflate, at most 16 MiB for
/// brotli, whose large-window extension is refused: HTTP's `br` is plain
/// RFC 7932).
pub fn decoded(headers: &[Header], body: &[u8], cap: usize) -> Option<Decoded> {
    if body.is_empty() {
        return None;
    }
    let codings = match codings(headers)? {
        Ok(codings) => codings,
        Err(error) => {
            return Some(Decoded {
                bytes: Vec::new(),
                truncated: false,
                error: Some(error),
            })
        }
    };
    let mut reader: Box<dyn Read + '_> = Box::new(body);
    for &coding in codings.iter().rev() {
        reader = match coding {
            Coding::Gzip => Box::new(Layer::new(
                coding,
                flate2::read::MultiGzDecoder::new(reader),
            )),
            Coding::Deflate => Box::new(Layer::new(coding, Inflate::new(reader))),
            Coding::Brotli => {
                let mut decoder = brotli::Decompressor::new(reader, INPUT_CHUNK);
                let set = decoder.set_parameter(
                    brotli_decompressor::BrotliDecoderParameter::BROTLI_DECODER_PARAM_LARGE_WINDOW,
                    0,
                );
                debug_assert!(set, "parameters can be set before the first read");
                Box::new(Layer::new(coding, decoder))
            }
        };
    }
    Some(read_capped(reader, cap))
}

/// The codings the `content-encoding` fields list, in the order they were
/// applied; `None` for none or an unknown one, `Err` for too many.
fn codings(headers: &[Header]) -> Option<Result<Vec<Coding>, String>> {
    let mut codings = Vec::new();
    let fields = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-encoding"));
    for field in fields {
        let text = std::str::from_utf8(&field.value).ok()?;
        for token in text.split(',').map(str::trim) {
            let coding = match token.to_ascii_lowercase().as_str() {
                "" | "identity" => continue,
                "gzip" | "x-gzip" => Coding::Gzip,
                "deflate" => Coding::Deflate,
                "br" => Coding::Brotli,
                _ => return None,
            };
            codings.push(coding);
        }
    }
    if codings.is_empty() {
        return None;
    }
    if codings.len() > MAX_CODINGS {
        return Some(Err(format!(
            "the body lists {} content codings; more than {MAX_CODINGS} are not decoded",
            codings.len()
        )));
    }
    Some(Ok(codings))
}

/// Reads `reader` to its end or to `cap` bytes, whichever comes first.
fn read_capped(mut reader: impl Read, cap: usize) -> Decoded {
    let mut bytes = Vec::new();
    let mut chunk = vec![0; INPUT_CHUNK];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => {
                return Decoded {
                    bytes,
                    truncated: false,
                    error: None,
                }
            }
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Decoded {
                    bytes,
                    truncated: false,
                    error: Some(err.to_string()),
                }
            }
        };
        let room = cap - bytes.len();
        let keep = n.min(room);
        if bytes.len() + keep > bytes.capacity() {
            // Grow by doubling, as `Vec` would, but never past the cap.
            let wanted = (bytes.len() + keep)
                .max(bytes.capacity().saturating_mul(2))
                .min(cap);
            bytes.reserve_exact(wanted - bytes.len());
        }
        bytes.extend_from_slice(&chunk[..keep]);
        if n > room {
            return Decoded {
                bytes,
                truncated: true,
                error: None,
            };
        }
    }
}

/// A decoder whose own errors name its coding. Errors from the layers
/// below pass through as they are, so the message names the coding that
/// failed.
struct Layer<R> {
    coding: Coding,
    inner: R,
}

/// An error already described by the layer it arose in.
#[derive(Debug)]
struct LayerError(String);

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayerError {}

impl<R> Layer<R> {
    fn new(coding: Coding, inner: R) -> Self {
        Self { coding, inner }
    }
}

impl<R: Read> Read for Layer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|err| {
            if err.get_ref().is_some_and(|e| e.is::<LayerError>()) {
                return err;
            }
            let coding = self.coding.name();
            let message = match err.kind() {
                io::ErrorKind::UnexpectedEof => {
                    format!("the {coding} data ends before its stream does")
                }
                _ => format!("the {coding} data is corrupt ({err})"),
            };
            io::Error::new(err.kind(), LayerError(message))
        })
    }
}

/// A deflate decoder that tells a stream cut short from a finished one
/// (flate2's readers end quietly in both cases) and reads zlib or raw
/// deflate, whichever the first two bytes say.
struct Inflate<R> {
    /// The compressed stream.
    inner: R,
    /// Compressed bytes read but not yet decoded: `input[start..end]`.
    input: Box<[u8]>,
    start: usize,
    end: usize,
    /// `inner` has no more.
    eof: bool,
    /// The decoder, once the header has said which kind to make.
    state: Option<Decompress>,
    /// The stream's end was decoded.
    done: bool,
}

impl<R: Read> Inflate<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            input: vec![0; INPUT_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            state: None,
            done: false,
        }
    }

    /// Reads more compressed bytes after those not yet decoded.
    fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        loop {
            match self.inner.read(&mut self.input[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
            return Ok(());
        }
    }
}

/// Whether `head` starts as RFC 1950 says: deflate, a window of at most
/// 32 KiB, and a check that makes the pair a multiple of 31.
fn is_zlib_header(head: &[u8]) -> bool {
    match head {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

impl<R: Read> Read for Inflate<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        if self.state.is_none() {
            while self.end < 2 && !self.eof {
                self.fill()?;
            }
            let zlib = is_zlib_header(&self.input[..self.end]);
            self.state = Some(Decompress::new(zlib));
        }
        loop {
            if self.start == self.end && !self.eof {
                self.fill()?;
            }
            let state = self.state.as_mut().expect("the decoder is made above");
            let (read_before, written_before) = (state.total_in(), state.total_out());
            let status = state
                .decompress(
                    &self.input[self.start..self.end],
                    out,
                    FlushDecompress::None,
                )
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
            let read = usize::try_from(state.total_in() - read_before)
                .expect("no more is read than the input slice holds");
            let written = usize::try_from(state.total_out() - written_before)
                .expect("no more is written than the output slice holds");
            self.start += read;
            if status == Status::StreamEnd {
                self.done = true;
                return Ok(written);
            }
            if written > 0 {
                return Ok(written);
            }
            if self.start == self.end && self.eof {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if read == 0 && self.start < self.end {
                // Input and room to write, yet no progress: the decoder
                // cannot go on with this stream.
                return Err(io::ErrorKind::InvalidData.into());
            }
        }
    }
}

/// `bytes` as text worth showing as text: UTF-8 without control characters
/// other than whitespace. Anything else is shown as base64, which JSON
/// does not inflate six times over as it does escaped control characters.
pub fn readable(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok().filter(|text| {
        !text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;

    use super::{decoded, Decoded};
    use crate::store::Header;

    const TEXT: &[u8] = b"{\"event\":\"payment.succeeded\",\"amount\":4200}\n";

    fn encoding(value: &str) -> Vec<Header> {
        vec![
            Header {
                name: "content-type".into(),
                value: b"application/json".to_vec(),
            },
            Header {
                name: "content-encoding".into(),
                value: value.as_bytes().to_vec(),
            },
        ]
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).expect("writes to memory");
        encoder.finish().expect("writes to memory")
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).expect("writes to memory");
        encoder.finish().expect("writes to memory")
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).expect("writes to memory");
        encoder.finish().expect("writes to memory")
    }

    fn brotli(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut encoder = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            encoder.write_all(data).expect("writes to memory");
        }
        out
    }

    fn whole(bytes: &[u8]) -> Option<Decoded> {
        Some(Decoded {
            bytes: bytes.to_vec(),
            truncated: false,
            error: None,
        })
    }

    #[test]
    fn gzip_and_x_gzip_decode() {
        assert_eq!(
            decoded(&encoding("gzip"), &gzip(TEXT), 1 << 20),
            whole(TEXT)
        );
        assert_eq!(
            decoded(&encoding("X-Gzip"), &gzip(TEXT), 1 << 20),
            whole(TEXT)
        );
    }

    #[test]
    fn concatenated_gzip_members_decode_as_one_body() {
        let mut body = gzip(b"first ");
        body.extend(gzip(b"second"));
        assert_eq!(
            decoded(&encoding("gzip"), &body, 1 << 20),
            whole(b"first second")
        );
    }

    #[test]
    fn deflate_decodes_zlib_wrapped_and_raw() {
        assert_eq!(
            decoded(&encoding("deflate"), &zlib(TEXT), 1 << 20),
            whole(TEXT)
        );
        assert_eq!(
            decoded(&encoding("deflate"), &raw_deflate(TEXT), 1 << 20),
            whole(TEXT)
        );
    }

    #[test]
    fn brotli_decodes() {
        assert_eq!(
            decoded(&encoding("br"), &brotli(TEXT), 1 << 20),
            whole(TEXT)
        );
    }

    #[test]
    fn large_window_brotli_is_refused() {
        let params = brotli::enc::BrotliEncoderParams {
            large_window: true,
            lgwin: 26,
            ..Default::default()
        };
        let mut body = Vec::new();
        brotli::BrotliCompress(&mut &TEXT[..], &mut body, &params).expect("writes to memory");
        let view = decoded(&encoding("br"), &body, 1 << 20).expect("br");
        assert!(view.error.is_some(), "{view:?}");
        assert!(view.bytes.is_empty());
    }

    #[test]
    fn stacked_codings_are_undone_last_first() {
        // `gzip, br`: gzip was applied first, then br.
        let body = brotli(&gzip(TEXT));
        assert_eq!(decoded(&encoding("gzip, br"), &body, 1 << 20), whole(TEXT));
        // The same list over two fields, with identity in between.
        let mut headers = encoding("gzip");
        headers.push(Header {
            name: "content-encoding".into(),
            value: b"identity , br".to_vec(),
        });
        assert_eq!(decoded(&headers, &body, 1 << 20), whole(TEXT));
    }

    #[test]
    fn unknown_missing_or_identity_codings_have_no_decoded_view() {
        assert_eq!(decoded(&encoding("zstd"), b"abc", 1 << 20), None);
        assert_eq!(
            decoded(&encoding("gzip, compress"), &gzip(TEXT), 1 << 20),
            None
        );
        assert_eq!(decoded(&encoding("identity"), TEXT, 1 << 20), None);
        assert_eq!(decoded(&encoding("gzip")[..1], TEXT, 1 << 20), None);
        assert_eq!(decoded(&encoding("gzip"), b"", 1 << 20), None);
    }

    #[test]
    fn too_many_codings_are_an_error() {
        let view =
            decoded(&encoding("gzip,gzip,gzip,gzip,gzip"), b"x", 1 << 20).expect("known codings");
        assert!(view.error.is_some_and(|e| e.contains("5 content codings")));
    }

    #[test]
    fn a_gzip_bomb_is_cut_at_the_cap() {
        // 1 GiB of zeros, compressed as it is produced: about 1 MiB.
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        let zeros = vec![0; 1 << 20];
        for _ in 0..1024 {
            encoder.write_all(&zeros).expect("writes to memory");
        }
        let bomb = encoder.finish().expect("writes to memory");
        assert!(bomb.len() < 4 << 20, "the bomb is small: {}", bomb.len());

        let cap = 1 << 20;
        let view = decoded(&encoding("gzip"), &bomb, cap).expect("gzip decodes");
        assert!(view.truncated);
        assert_eq!(view.error, None);
        assert_eq!(view.bytes.len(), cap);
        assert!(view.bytes.capacity() <= cap, "never allocates past the cap");
        assert!(view.bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_body_exactly_at_the_cap_is_not_truncated() {
        let view = decoded(&encoding("gzip"), &gzip(TEXT), TEXT.len()).expect("gzip");
        assert_eq!(Some(view), whole(TEXT));
        let view = decoded(&encoding("gzip"), &gzip(TEXT), TEXT.len() - 1).expect("gzip");
        assert!(view.truncated);
        assert_eq!(view.bytes, TEXT[..TEXT.len() - 1]);
    }

    #[test]
    fn corrupt_bodies_give_an_error() {
        for coding in ["gzip", "deflate", "br"] {
            let view = decoded(
                &encoding(coding),
                b"\xff\xfe definitely not compressed",
                1 << 20,
            )
            .expect("known coding");
            let error = view.error.expect("corrupt data is an error");
            assert!(error.contains(coding), "{error}");
            assert!(!view.truncated);
        }
    }

    #[test]
    fn a_cut_body_decodes_as_far_as_it_goes() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|n| n.to_string().into_bytes())
            .collect();
        for (coding, body) in [
            ("gzip", gzip(&text)),
            ("deflate", zlib(&text)),
            ("deflate", raw_deflate(&text)),
            ("br", brotli(&text)),
        ] {
            let cut = &body[..body.len() / 2];
            let view = decoded(&encoding(coding), cut, usize::MAX).expect("known coding");
            let error = view.error.expect("a cut stream is an error");
            assert!(error.contains(coding), "{error}");
            assert!(!view.bytes.is_empty(), "{coding}: something decoded");
            assert!(
                text.starts_with(&view.bytes),
                "{coding}: what decoded is exact"
            );
        }
    }

    #[test]
    fn an_error_in_an_inner_coding_names_that_coding() {
        // br on the outside is fine; the gzip inside is garbage.
        let body = brotli(b"not gzip at all");
        let view = decoded(&encoding("gzip, br"), &body, 1 << 20).expect("known codings");
        let error = view.error.expect("the gzip layer fails");
        assert!(error.contains("gzip"), "{error}");
    }
}
