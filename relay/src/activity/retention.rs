//! Retention: the log is pruned by age and by size, oldest first, in the
//! background, so one flooded tunnel cannot evict everyone's history.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::activity::capture::Recorder;
use crate::store::{now_micros, ActivityLog, NameRegistry, Retention};

/// How often the log is pruned at the least.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The share of `--retention-max-bytes` written since the last prune that
/// prunes again at once: a flood cannot fill the disk between two ticks,
/// and a prune (which holds the writer) does not run every second of it.
const PRUNE_AFTER_SHARE: u64 = 4;

/// Prunes `log` (and forgets expired name holds) now, every
/// [`PRUNE_EVERY`], and whenever `recorder` has written a quarter of the
/// size limit since the last prune, until `stop`.
pub async fn prune_until(
    log: Arc<dyn ActivityLog>,
    names: Arc<dyn NameRegistry>,
    webhooks: Arc<dyn crate::store::Webhooks>,
    retention: Retention,
    recorder: Recorder,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(PRUNE_EVERY);
    let mut committed = recorder.committed();
    let written = || recorder.stats().written_bytes.load(Ordering::Relaxed);
    let mut pruned_at = written();
    let enough = (retention.max_bytes / PRUNE_AFTER_SHARE).max(1);
    loop {
        // Both arms are cancel-safe.
        tokio::select! {
            _ = ticks.tick() => {}
            changed = committed.changed() => {
                if changed.is_err() || written().saturating_sub(pruned_at) < enough {
                    continue;
                }
            }
            () = stop.cancelled() => return,
        }
        pruned_at = written();
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
        // Finished deliveries are kept as long as the log keeps their
        // attempts, and event ids for the whole dedup window however short
        // the retention.
        let keep = retention.max_age.max(crate::dispatch::DEDUP_WINDOW);
        let oldest = now.saturating_sub(i64::try_from(keep.as_micros()).unwrap_or(i64::MAX));
        if let Err(err) = webhooks.prune_deliveries(oldest).await {
            tracing::warn!(%err, "finished deliveries not pruned");
        }
    }
}
