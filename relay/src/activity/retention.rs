//! Retention: the log is pruned by age and by size, oldest first, in the
//! background, so one flooded tunnel cannot evict everyone's history.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{now_micros, ActivityLog, NameRegistry, Retention};

/// How often the log is pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Prunes `log` (and forgets expired name holds) every [`PRUNE_EVERY`],
/// starting now, until `stop`.
pub async fn prune_until(
    log: Arc<dyn ActivityLog>,
    names: Arc<dyn NameRegistry>,
    retention: Retention,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = now_micros();
        match log.prune(retention, now).await {
            Ok(pruned) if pruned.entries > 0 => {
                tracing::info!(
                    entries = pruned.entries,
                    bytes = pruned.bytes,
                    "activity log pruned"
                )
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "activity log prune failed"),
        }
        if let Err(err) = names.forget_expired(now).await {
            tracing::warn!(%err, "expired name holds not forgotten");
        }
    }
}
