//! `kairos schemas`: the contract for producers. `show` prints the Kairos schema of an
//! input topic; `check` tells a producer, before they register or produce, whether
//! Kairos can read records written with their schema, by the resolution rules the
//! processors apply to every Avro message (checked on the schemas, so stricter in one
//! way: an enum symbol Kairos lacks fails it even if no record would carry it).

use std::path::Path;

use anyhow::Context;
use apache_avro::Schema;
use kairos_core::config::Config;
use kairos_core::schemas::{self, InputContract};

/// The input contract of `topic` (with or without the configured prefix), or an error
/// that lists the input topics.
pub fn contract(config: &Config, topic: &str) -> anyhow::Result<&'static InputContract> {
    let prefix = &config.kafka.topic_prefix;
    schemas::input_contract(topic, prefix).with_context(|| {
        let known: Vec<String> = schemas::INPUTS
            .iter()
            .map(|c| config.topic(c.topic))
            .collect();
        format!(
            "{topic:?} is not a Kairos input topic; producers write to {}",
            known.join(", ")
        )
    })
}

/// Reads and parses a producer's schema file; errors name the file, and for JSON
/// syntax errors the line and column.
pub fn read_schema(path: &Path) -> anyhow::Result<Schema> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        // serde_json ends its message with the place, which leads here instead.
        let message = e.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(&*message, |(m, _)| m);
        anyhow::anyhow!(
            "{}:{}:{}: not JSON: {message}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    Schema::parse(&json).map_err(|e| anyhow::anyhow!("{}: not an Avro schema: {e}", path.display()))
}

/// Checks the producer's schema at `path` against the Kairos schema of `topic`.
/// Returns the verdict as a line for the user, and whether Kairos can read it.
pub fn check(config: &Config, topic: &str, path: &Path) -> anyhow::Result<(bool, String)> {
    let contract = contract(config, topic)?;
    let writer = read_schema(path)?;
    let full_topic = config.topic(contract.topic);
    Ok(
        match schemas::check_readable(&writer, (contract.reader)()) {
            Ok(()) => (
                true,
                format!(
                    "compatible: Kairos reads records written with {} on {full_topic} (as schemas/{})",
                    path.display(),
                    contract.file
                ),
            ),
            Err(why) => (
                false,
                format!(
                    "incompatible: Kairos cannot read records written with {} on {full_topic} (as schemas/{}): {why}",
                    path.display(),
                    contract.file
                ),
            ),
        },
    )
}
