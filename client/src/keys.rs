//! The reconnect key a client keeps per relay, in its config directory, so
//! that a restarted `ferry http` gets its own held subdomain back from a
//! relay without tokens.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The file under `dir` that holds the key for `relay`: one file per relay,
/// named for a hash of its URL.
fn key_file(dir: &Path, relay: &str) -> PathBuf {
    // FNV-1a: stable across builds, unlike std's hasher, so an upgraded
    // client finds the keys an older one saved.
    let hash = relay
        .trim_end_matches('/')
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    dir.join("relays").join(format!("{hash:016x}.key"))
}

/// The key kept under `dir` for `relay`, made and saved on first use.
/// The file is readable by its owner only: whoever has the key can take the
/// client's subdomain over.
pub fn client_key(dir: &Path, relay: &str) -> std::io::Result<String> {
    let path = key_file(dir, relay);
    match std::fs::read_to_string(&path) {
        Ok(text) if is_key(text.trim()) => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let key = format!("{:032x}", rand::random::<u128>());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    writeln!(file, "{key}")?;
    Ok(key)
}

fn is_key(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::client_key;

    #[test]
    fn keys_are_kept_per_relay_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("ferry-keys-{}", std::process::id()));
        let a = client_key(&dir, "wss://a.example/api/v1/tunnels/connect").unwrap();
        let again = client_key(&dir, "wss://a.example/api/v1/tunnels/connect").unwrap();
        let b = client_key(&dir, "wss://b.example/api/v1/tunnels/connect").unwrap();
        assert_eq!(a, again);
        assert_ne!(a, b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
