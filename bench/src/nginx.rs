//! Debian's nginx as the origin (`--origin nginx`): a server every tunnel
//! can be measured against that is not ours.
//!
//! It serves the builtin origin's paths: `/1k` and `/download` from static
//! files, and `/upload` proxied unbuffered to a builtin origin, since nginx
//! can only discard a body, not answer with the count of bytes it got,
//! which the upload scenario checks.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::procs::Proc;

/// Where Debian's `nginx-light` puts the binary.
const NGINX: &str = "/usr/sbin/nginx";
/// How long nginx may take to accept connections.
const READY_WAIT: Duration = Duration::from_secs(30);

/// The nginx.conf the bench runs: one worker in the foreground on `listen`,
/// every path it writes inside `dir`, `/upload` passed on to `upload`.
pub fn config(dir: &Path, listen: SocketAddr, upload: SocketAddr) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    server {{
        listen {listen};
        root {dir}/www;
        location = /1k {{
        }}
        location = /download {{
            try_files /download =404;
        }}
        location = /upload {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_pass http://{upload};
        }}
    }}
}}
"
    )
}

/// nginx serving `download_bytes` at `/download`, with uploads going on
/// to `upload`, the builtin origin. Its temporary directory lives as long
/// as the returned process.
pub async fn start(upload: SocketAddr, download_bytes: u64) -> Result<(Proc, SocketAddr), String> {
    if !Path::new(NGINX).exists() {
        return Err(format!(
            "{NGINX} is missing: `apt-get install nginx-light` for --origin nginx"
        ));
    }
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-nginx-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let www = dir.path().join("www");
    std::fs::create_dir(&www).map_err(|e| format!("cannot create {}: {e}", www.display()))?;
    std::fs::write(www.join("1k"), vec![b'x'; 1024])
        .map_err(|e| format!("cannot write nginx's /1k: {e}"))?;
    // Sparse: the download is read from the page cache, not from a disk.
    std::fs::File::create(www.join("download"))
        .and_then(|file| file.set_len(download_bytes))
        .map_err(|e| format!("cannot write nginx's /download: {e}"))?;
    // nginx takes an address, not a listener: a free port, released just
    // before it binds it.
    let listen = crate::peers::free_port()?;
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, config(dir.path(), listen, upload))
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
    let error_log = dir.path().join("error.log");
    let args = [
        "-p".to_owned(),
        dir.path().display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ];
    let mut nginx = Proc::spawn_in(Path::new(NGINX), &args, &[], Some(dir))?;
    if let Err(err) = nginx.accepting(listen, READY_WAIT).await {
        let log = std::fs::read_to_string(&error_log).unwrap_or_default();
        return Err(format!("nginx did not start: {err}\n{}", log.trim()));
    }
    Ok((nginx, listen))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use super::config;

    #[test]
    fn the_config_keeps_every_path_in_its_folder_and_passes_uploads_on() {
        let listen: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let upload: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let conf = config(Path::new("/tmp/x"), listen, upload);
        assert!(conf.contains("listen 127.0.0.1:8081;"));
        assert!(conf.contains("proxy_pass http://127.0.0.1:9000;"));
        assert!(conf.contains("daemon off;"));
        assert!(conf.contains("access_log off;"));
        // Nothing outside the folder: every absolute path in it is under it.
        for word in conf.split_whitespace() {
            if word.starts_with('/') && !word.starts_with("/1k") {
                assert!(
                    word.starts_with("/tmp/x/")
                        || word.starts_with("/download")
                        || word.starts_with("/upload"),
                    "{word} is outside the folder"
                );
            }
        }
    }
}
