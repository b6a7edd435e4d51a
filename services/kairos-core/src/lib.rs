//! Kairos core: what every service shares.
//!
//! - [`contracts`] and [`schemas`]: the event types and their Avro schemas;
//! - [`encoding`]: JSON and Confluent-Avro input, JSON internal topics;
//! - [`config`]: the TOML config with environment overrides;
//! - [`store`] and [`runtime`]: per-partition RocksDB state, persistent timers and the
//!   exactly-once processing loop;
//! - [`kafka`], [`admin`], [`metrics`], [`logging`], [`time`], [`ids`].

pub mod admin;
pub mod calendar;
pub mod config;
pub mod contracts;
pub mod dedup;
pub mod encoding;
pub mod identifiers;
pub mod ids;
pub mod ignored_row;
pub mod input;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod replay;
pub mod runtime;
pub mod schemas;
pub mod small_map;
pub mod state_cache;
pub mod store;
pub mod time;

use tokio_util::sync::CancellationToken;

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM: the start of a graceful shutdown.
/// A second signal exits at once.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight work");
        t.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal; exiting immediately");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
