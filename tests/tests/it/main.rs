//! End-to-end scenarios, one binary: real relays, clients and origins on
//! loopback port 0.

mod accounts;
mod acme;
mod activity;
mod activity_attacks;
mod attacks;
mod bad_input;
mod dashboard;
mod dev_tls;
mod dispatch;
mod dispatch_queue;
mod dns;
mod export;
mod fleet;
mod fleet_dispatch;
mod fleet_link;
mod forwarding;
mod handshake;
mod hosts;
mod isolation;
mod limits;
mod postgres_tls;
mod proxy;
mod reconnect;
mod shared_store;
mod store_contract;
mod streaming;
mod tls;
mod websocket;
