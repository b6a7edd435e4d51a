//! `kairos inspect state`: a digest of a processor's state, for comparing runs
//! (crash and rebalance tests) and for operators checking replicas.
//!
//! The digest covers customer state, timers, applied offsets and the event-time clock,
//! not the outbox (which holds transient, already-decided outputs).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use kairos_core::config::Config;
use kairos_core::store::StoreFactory;
use rocksdb::{IteratorMode, Options, DB};
use sha2::{Digest, Sha256};

/// Digest of the stores under `root` (one per partition), read-only.
pub fn digest_dir(root: &Path) -> anyhow::Result<BTreeMap<String, (u64, String)>> {
    let mut out = BTreeMap::new();
    let mut dirs: Vec<_> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('p'))
        .collect();
    dirs.sort_by_key(|e| e.file_name());
    for d in dirs {
        let db = DB::open_for_read_only(&Options::default(), d.path(), false)
            .with_context(|| format!("cannot open {}", d.path().display()))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        for item in db.iterator(IteratorMode::Start) {
            let (k, v) = item?;
            let keep = [b"s/".as_slice(), b"t/", b"i/", b"o/", b"m/clock"]
                .iter()
                .any(|p| k.starts_with(p));
            if keep && std::env::var("KAIROS_INSPECT_KEYS").is_ok() {
                let shown = match <[u8; 8]>::try_from(v.as_ref()) {
                    Ok(b) if k.starts_with(b"o/") || k.starts_with(b"m/") => {
                        u64::from_be_bytes(b).to_string()
                    }
                    _ if std::env::var("KAIROS_INSPECT_VALUES").is_ok() => {
                        String::from_utf8_lossy(&v).into_owned()
                    }
                    _ => hex::encode(Sha256::digest(&v)),
                };
                println!(
                    "{} {} {shown}",
                    d.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&k)
                );
            }
            if keep {
                h.update((k.len() as u64).to_be_bytes());
                h.update(&k);
                h.update((v.len() as u64).to_be_bytes());
                h.update(&v);
                n += 1;
            }
        }
        out.insert(
            d.file_name().to_string_lossy().into_owned(),
            (n, hex::encode(h.finalize())),
        );
    }
    Ok(out)
}

/// Restores every partition of `service` from its changelog into a temporary
/// directory and digests it.
pub fn digest_changelog(
    config: &Config,
    service: &str,
) -> anyhow::Result<BTreeMap<String, (u64, String)>> {
    let tmp = tempfile::tempdir()?;
    let factory = StoreFactory::new(tmp.path(), 8 << 20)?
        .with_timers_in_memory(config.timers_in_memory_per_store());
    let topic = config.changelog_topic(service);
    let reader = kairos_core::runtime::ChangelogReader::new(config)?;
    for p in 0..config.kafka.partitions {
        kairos_core::runtime::restore_partition(
            &reader,
            config,
            &factory,
            &topic,
            p,
            kairos_core::runtime::TornCommit::Leave,
            false,
        )?;
    }
    digest_dir(tmp.path())
}

pub fn print(digests: &BTreeMap<String, (u64, String)>) {
    let mut total = Sha256::new();
    let mut records = 0;
    for (p, (n, d)) in digests {
        println!("{p} {n} {d}");
        total.update(d.as_bytes());
        records += n;
    }
    println!("total {records} {}", hex::encode(total.finalize()));
}
