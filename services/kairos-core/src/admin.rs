//! The admin HTTP server every service runs: /metrics, /healthz, /readyz, /partitions,
//! plus any service-specific routes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::time::wall_now;

/// Shared between a service's processing loop and its admin server.
pub struct AdminState {
    pub registry: Registry,
    /// Dead letters by reason: the runtime's and a delivery worker's webhooks'.
    pub dead_letters: prometheus::IntCounterVec,
    ready: AtomicBool,
    last_heartbeat: AtomicI64,
    /// `last_heartbeat` for Prometheus, set at each scrape: a loop stuck in a retry
    /// (a broker refusing its records, an unreachable schema registry) stops every
    /// other gauge it would update, its lag included.
    heartbeat_seconds: prometheus::Gauge,
    /// The state partitions this instance owns, for `/partitions`.
    owned: Mutex<Vec<i32>>,
}

impl AdminState {
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(AdminState {
            dead_letters: crate::metrics::dead_letters(&registry),
            heartbeat_seconds: crate::metrics::gauge_f64(
                &registry,
                "kairos_processing_loop_heartbeat_timestamp_seconds",
                "When the processing loop last went round (Unix time; a restore beats every second): one that stopped is stuck in a retry or hung.",
            ),
            registry,
            ready: AtomicBool::new(false),
            last_heartbeat: AtomicI64::new(wall_now()),
            owned: Mutex::new(Vec::new()),
        })
    }

    /// The processing loop reports the partitions it owns after each rebalance.
    pub fn set_owned(&self, mut partitions: Vec<i32>) {
        partitions.sort_unstable();
        if let Ok(mut owned) = self.owned.lock() {
            *owned = partitions;
        }
    }

    pub fn owned(&self) -> Vec<i32> {
        self.owned.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Ready: partitions assigned and their state open.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The processing loop calls this every iteration; /healthz fails if it stops.
    pub fn heartbeat(&self) {
        self.last_heartbeat.store(wall_now(), Ordering::Relaxed);
    }

    /// Awaits `work` (the restore of a partition from its changelog, which may take
    /// minutes), beating the heart and calling `each_beat` every second meanwhile: a
    /// liveness probe that restarted an instance for restoring would make it restore
    /// again from scratch, and the Kafka consumer must be polled (see
    /// `runtime::KeepInGroup`). Work that outlasts one beat leaves the instance not
    /// ready; the processing loop says ready again when it is done.
    pub async fn beating_while<T>(
        &self,
        work: impl std::future::Future<Output = T>,
        each_beat: impl FnMut(),
    ) -> T {
        self.beating_every(BEAT_WHILE_BUSY, work, each_beat).await
    }

    async fn beating_every<T>(
        &self,
        beat: std::time::Duration,
        work: impl std::future::Future<Output = T>,
        mut each_beat: impl FnMut(),
    ) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = tokio::time::sleep(beat) => {
                    self.heartbeat();
                    self.set_ready(false);
                    each_beat();
                }
            }
        }
    }

    /// When the processing loop last reported (wall clock, milliseconds).
    pub fn last_heartbeat(&self) -> i64 {
        self.last_heartbeat.load(Ordering::Relaxed)
    }

    pub fn render_metrics(&self) -> String {
        self.heartbeat_seconds
            .set(self.last_heartbeat() as f64 / 1000.0);
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// How long the processing loop may be silent before /healthz reports failure.
const STALL_MILLIS: i64 = 60_000;

/// How often [`AdminState::beating_while`] beats: well within the consumer's
/// `max.poll.interval.ms`, which may be set as low as its session timeout.
const BEAT_WHILE_BUSY: std::time::Duration = std::time::Duration::from_secs(1);

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        state.render_metrics(),
    )
}

async fn healthz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let silent = wall_now() - state.last_heartbeat();
    if silent > STALL_MILLIS {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("processing loop silent for {silent} ms\n"),
        )
    } else {
        (StatusCode::OK, "ok\n".to_string())
    }
}

/// `{"owned": [..]}`: the state partitions this instance owns now, so a router can send
/// a request for a key (an in-app poll) to the instance that owns its partition.
async fn partitions(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "owned": state.owned() }))
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if state.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds the admin server and serves it until `cancel` fires. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    state: Arc<AdminState>,
    extra: Router,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/partitions", get(partitions))
        .with_state(state)
        .merge(extra);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind admin server on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    tracing::info!(%addr, "admin server listening (/metrics, /healthz, /readyz)");
    Ok(addr)
}

/// Writes `addr` to `file` whole or not at all (a temporary file renamed into place), so
/// a reader polling for the file never sees half an address.
pub fn write_address_file(file: &std::path::Path, addr: SocketAddr) -> anyhow::Result<()> {
    let partial = file.with_extension("partial");
    std::fs::write(&partial, addr.to_string())
        .and_then(|()| std::fs::rename(&partial, file))
        .map_err(|e| anyhow::anyhow!("cannot write the admin address to {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore longer than a beat keeps the instance alive (not restarted
    /// by a liveness probe) but not ready; work done within a beat changes nothing.
    #[tokio::test]
    async fn long_rebalance_work_beats_the_heart_and_is_not_ready() {
        let beat = std::time::Duration::from_millis(20);
        let admin = AdminState::new(Registry::new());
        admin.set_ready(true);
        admin.last_heartbeat.store(0, Ordering::Relaxed);
        let mut beats = 0;
        let quick = admin.beating_every(beat, async { 7 }, || beats += 1).await;
        assert_eq!(quick, 7);
        assert!(admin.is_ready());
        assert_eq!(admin.last_heartbeat(), 0);
        assert_eq!(beats, 0);
        let restored = admin
            .beating_every(
                beat,
                async {
                    tokio::time::sleep(beat * 10).await;
                    "restored"
                },
                || beats += 1,
            )
            .await;
        assert_eq!(restored, "restored");
        assert!(admin.last_heartbeat() > 0, "no beat while restoring");
        assert!(!admin.is_ready());
        // About 10; a loaded machine's timers may run late.
        assert!(beats >= 2, "the action ran at {beats} beats of about 10");
    }

    /// The scrape tells when the loop last went round, not when the metric was made.
    #[test]
    fn metrics_tell_when_the_processing_loop_last_went_round() {
        let admin = AdminState::new(Registry::new());
        admin
            .last_heartbeat
            .store(1_700_000_000_500, Ordering::Relaxed);
        let text = admin.render_metrics();
        assert!(
            text.contains("kairos_processing_loop_heartbeat_timestamp_seconds 1700000000.5\n"),
            "{text}"
        );
        admin.heartbeat();
        let later = admin.render_metrics();
        let beat: f64 = later
            .lines()
            .find_map(|l| l.strip_prefix("kairos_processing_loop_heartbeat_timestamp_seconds "))
            .and_then(|v| v.parse().ok())
            .expect("the heartbeat sample");
        assert!(beat * 1000.0 >= (wall_now() - 60_000) as f64, "{beat}");
    }
}
