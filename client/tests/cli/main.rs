//! The `ferry` command line, run as the real binary: `ferry http` and its
//! embedded relay, the log commands (`log`, `show`, `export`, `replay`)
//! reading that relay's log through its API or straight from its database,
//! and the webhook commands (`webhooks`, `events`, `event-types`) calling
//! its API; and what `ferry http` prints on a terminal, on a pipe and as
//! JSON. Every read of a child's output and every request is bounded,
//! and a failing test kills the children it started.

mod harness;
mod http;
mod log;
mod terminal;
mod webhooks;
