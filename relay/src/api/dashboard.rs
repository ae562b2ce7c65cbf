//! The dashboard: its page and assets, embedded in the binary (relays run
//! on closed networks, so nothing comes from elsewhere), and the sign-in
//! that turns a token into a session cookie for the browser, whose
//! `EventSource` cannot send an `Authorization` header.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::{json, read_json_within, ApiError, Caller};
use crate::accounts::{session_cookie_name, AuthError, Principal, SESSION_LIFETIME};
use crate::{full, Body, State};

/// The files under `relay/assets/`.
#[derive(rust_embed::Embed)]
#[folder = "assets/"]
struct Assets;

/// The page may load only the relay's own scripts, styles and API.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The largest sign-in body: a token and its JSON.
const MAX_SIGN_IN_BODY: usize = 4096;

/// `GET /`.
pub(crate) fn page(req: &Request<Incoming>) -> Response<Body> {
    asset("index.html", req)
}

/// `GET /assets/{path}`: an embedded file, with a validator so a reload
/// costs a 304.
pub(crate) fn asset(path: &str, req: &Request<Incoming>) -> Response<Body> {
    let Some(file) = Assets::get(path) else {
        return super::error_response(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the dashboard has no file {path}"),
        ));
    };
    let etag: String = file.metadata.sha256_hash()[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let etag = format!("\"{etag}\"");
    let unchanged = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut response = if unchanged {
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        Response::new(full(file.data.into_owned()))
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type(path));
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}

fn content_type(path: &str) -> HeaderValue {
    let ext = path.rsplit_once('.').map_or("", |(_, ext)| ext);
    HeaderValue::from_static(match ext {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        _ => "application/octet-stream",
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    #[serde(default)]
    token: String,
}

/// `GET /api/v1/session`: who the browser is signed in as; `POST` signs in
/// with `{"token"}`; `DELETE` signs out.
pub(crate) async fn session(
    state: &Arc<State>,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let accounts = &state.accounts;
    let open = accounts.is_open();
    let answer = |principal: Option<Principal>| {
        json(&serde_json::json!({
            "signed_in": open || principal.is_some(),
            "open": open,
            "account": principal.as_ref().map(|p| p.account.to_string()),
            "admin": principal.is_some_and(|p| p.admin),
        }))
    };
    match *req.method() {
        hyper::Method::GET => {
            match accounts.authorize_api(req.headers(), caller.peer, caller.https) {
                Ok(principal) => Ok(answer(principal)),
                Err(AuthError::Missing | AuthError::SessionEnded) => Ok(answer(None)),
                Err(err) => Err(err.into()),
            }
        }
        hyper::Method::POST => {
            if open {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "no_sign_in",
                    "this relay has no tokens: the dashboard needs no sign-in",
                ));
            }
            let body: SignIn = read_json_within(req, false, MAX_SIGN_IN_BODY).await?;
            if body.token.trim().is_empty() {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "token_required",
                    "send {\"token\": \"YOUR TOKEN\"}: the token ferry connects with",
                ));
            }
            let (principal, cookie) = accounts.sign_in(&body.token, caller.peer)?;
            let max_age = SESSION_LIFETIME.as_secs();
            let mut response = answer(Some(principal));
            set_cookie(&mut response, &cookie, max_age, caller.https);
            Ok(response)
        }
        _ => {
            accounts.sign_out(req.headers(), caller.https);
            let mut response = Response::new(full(""));
            *response.status_mut() = StatusCode::NO_CONTENT;
            set_cookie(&mut response, "", 0, caller.https);
            Ok(response)
        }
    }
}

/// A host-only cookie (no `Domain`), so the browser never sends it to a
/// tunnel's subdomain; `Strict`, so no other site's page carries it;
/// `__Host-` and `Secure` over HTTPS.
fn set_cookie(response: &mut Response<Body>, value: &str, max_age: u64, https: bool) {
    let name = session_cookie_name(https);
    let secure = if https { "; Secure" } else { "" };
    let cookie =
        format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
}
