//! WebSocket upgrades from the public side reach the local server (as an
//! RFC 8441 extended CONNECT inside the tunnel) and work both ways.

use ferry_tests::{host_of, stop_all, within, Body, ClientOptions, Origin, TestClient, TestRelay};
use futures_util::{SinkExt, StreamExt};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// An origin whose `/socket` echoes every message, and closes with code
/// 4000 when told `close-me`.
async fn echo_origin() -> Origin {
    Origin::start(|mut req: Request<hyper::body::Incoming>| async move {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(ferry_tests::empty())
                .expect("response");
        };
        let protocol = req.headers().get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = ws.next().await {
                if matches!(&message, Message::Text(text) if text.as_str() == "close-me") {
                    let frame = CloseFrame {
                        code: CloseCode::Library(4000),
                        reason: "done".into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                } else if (message.is_text() || message.is_binary())
                    && ws.send(message).await.is_err()
                {
                    break;
                }
            }
        });
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(key.as_bytes()),
            );
        if let Some(protocol) = protocol {
            let first = protocol
                .to_str()
                .unwrap_or("")
                .split(',')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            response = response.header(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(&first).expect("token"),
            );
        }
        response
            .body::<Body>(ferry_tests::empty())
            .expect("response")
    })
    .await
}

#[tokio::test]
async fn websocket_echo_works_through_the_tunnel() {
    let relay = TestRelay::open().await;
    let origin = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let stream = TcpStream::connect(relay.addr).await.expect("relay accepts");
    let url = format!("ws://{}/socket", host_of(&client.public_url));
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .expect("valid url");
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("chat, superchat"),
    );
    let (mut ws, response) = within(
        "the websocket handshake",
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("websocket handshake through the tunnel");
    assert_eq!(response.headers()[header::SEC_WEBSOCKET_PROTOCOL], "chat");

    ws.send(Message::text("hello")).await.expect("send text");
    let echoed = within("the text echo", ws.next())
        .await
        .expect("a message")
        .expect("message");
    assert_eq!(echoed, Message::text("hello"));

    let binary: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    ws.send(Message::binary(binary.clone()))
        .await
        .expect("send binary");
    let echoed = within("the binary echo", ws.next())
        .await
        .expect("a message")
        .expect("message");
    assert_eq!(echoed, Message::binary(binary));

    ws.send(Message::text("close-me"))
        .await
        .expect("send close request");
    let closed = within("the close frame", ws.next())
        .await
        .expect("a message")
        .expect("message");
    let Message::Close(Some(frame)) = closed else {
        panic!("expected a close frame, got {closed:?}")
    };
    assert_eq!(u16::from(frame.code), 4000);
    assert_eq!(frame.reason.as_str(), "done");
    drop(ws);

    stop_all(client, origin, relay).await;
}

/// Opens a WebSocket through a tunnel to an origin that answers every
/// request with `status` and `body`; returns what the caller got instead of
/// an open socket.
async fn refused_upgrade(status: StatusCode, body: &'static str) -> (StatusCode, String) {
    let relay = TestRelay::open().await;
    let origin = Origin::start(move |_req| async move {
        Response::builder()
            .status(status)
            .body(ferry_tests::full(body))
            .expect("response")
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let stream = TcpStream::connect(relay.addr).await.expect("relay accepts");
    let url = format!("ws://{}/socket", host_of(&client.public_url));
    let err = within(
        "the websocket handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect_err("the origin does not upgrade");
    let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP error, got {err}")
    };
    stop_all(client, origin, relay).await;
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    (response.status(), body)
}

#[tokio::test]
async fn an_upgrade_answered_with_200_is_a_502_not_an_open_socket() {
    let (status, body) = refused_upgrade(StatusCode::OK, "<html>not a socket</html>").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("instead of 101"), "{body}");
}

#[tokio::test]
async fn a_refused_websocket_upgrade_returns_the_origin_answer() {
    let (status, body) = refused_upgrade(StatusCode::FORBIDDEN, "no sockets here").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "no sockets here");
}
