//! The Avro schemas of the Kairos topics, embedded at compile time from `schemas/*.avsc`.
//!
//! The files are the contract; `tests/contracts.rs` proves that they equal the schemas
//! derived from the types in [`crate::contracts`] and that they parse, so the `expect`s
//! below can only fire on a build that never ran its tests.

use std::sync::OnceLock;

use apache_avro::Schema;

/// One schema file: its name under `schemas/` and its text.
#[derive(Debug, Clone, Copy)]
pub struct SchemaFile {
    pub file: &'static str,
    pub text: &'static str,
}

macro_rules! schemas {
    ($( $(#[$doc:meta])* $text:ident, $parsed:ident, $file:literal; )*) => {
        $(
            $(#[$doc])*
            pub const $text: &str = include_str!(concat!("../../../schemas/", $file));

            $(#[$doc])*
            pub fn $parsed() -> &'static Schema {
                static PARSED: OnceLock<Schema> = OnceLock::new();
                PARSED.get_or_init(|| {
                    Schema::parse_str($text)
                        .expect(concat!("schemas/", $file, " is not a valid Avro schema"))
                })
            }
        )*

        /// Every schema file, in topic-flow order.
        pub const ALL: &[SchemaFile] = &[$(SchemaFile { file: $file, text: $text }),*];
    };
}

schemas! {
    /// `CustomerEvent`: topics `events.site` and `events.app`.
    CUSTOMER_EVENT, customer_event, "customer_event.avsc";
    /// `OfflineReceipt`: topic `events.offline`.
    OFFLINE_RECEIPT, offline_receipt, "offline_receipt.avsc";
    /// `CatalogUpdate`: topic `catalog`.
    CATALOG_UPDATE, catalog_update, "catalog_update.avsc";
    /// `ProductInterest`: internal topic `product-interest`, keyed by product id.
    PRODUCT_INTEREST, product_interest, "product_interest.avsc";
    /// `ProductOccasion`: internal topic `product-occasions`, keyed by customer id.
    PRODUCT_OCCASION, product_occasion, "product_occasion.avsc";
    /// `SegmentTransition`: topic `segment-transitions`.
    SEGMENT_TRANSITION, segment_transition, "segment_transition.avsc";
    /// `Trigger`: topic `triggers`.
    TRIGGER, trigger, "trigger.avsc";
    /// `Decision`: topic `decisions`.
    DECISION, decision, "decision.avsc";
    /// `SendCommand`: topics `send.<channel>`.
    SEND_COMMAND, send_command, "send_command.avsc";
    /// `Outcome`: topic `outcomes`.
    OUTCOME, outcome, "outcome.avsc";
    /// `DeadLetter`: topic `deadletter`.
    DEAD_LETTER, dead_letter, "dead_letter.avsc";
}

/// An input topic producers write to, and the Kairos schema that reads it.
#[derive(Debug, Clone, Copy)]
pub struct InputContract {
    /// The topic's name without the configured prefix (`events.site`).
    pub topic: &'static str,
    pub file: &'static str,
    pub text: &'static str,
    pub reader: fn() -> &'static Schema,
}

/// The input topics, in the order of `crate::config::topics`.
pub const INPUTS: &[InputContract] = &[
    InputContract {
        topic: crate::config::topics::SITE_EVENTS,
        file: "customer_event.avsc",
        text: CUSTOMER_EVENT,
        reader: customer_event,
    },
    InputContract {
        topic: crate::config::topics::APP_EVENTS,
        file: "customer_event.avsc",
        text: CUSTOMER_EVENT,
        reader: customer_event,
    },
    InputContract {
        topic: crate::config::topics::OFFLINE_EVENTS,
        file: "offline_receipt.avsc",
        text: OFFLINE_RECEIPT,
        reader: offline_receipt,
    },
    InputContract {
        topic: crate::config::topics::CATALOG,
        file: "catalog_update.avsc",
        text: CATALOG_UPDATE,
        reader: catalog_update,
    },
];

/// The input contract of `topic`, named with or without the topic `prefix`.
pub fn input_contract(topic: &str, prefix: &str) -> Option<&'static InputContract> {
    let short = topic.strip_prefix(prefix).unwrap_or(topic);
    INPUTS.iter().find(|c| c.topic == short)
}

/// Whether records written with `writer` can be read as `reader` under Avro's schema
/// resolution rules (a field the reader has and the writer lacks needs a default, a
/// type may only be promoted, every enum symbol of the writer must exist in the
/// reader, ...). A check of the schemas, not of records: it fails on an enum symbol the
/// reader lacks even if no record carries it. The error is the first incompatibility
/// found, with its causes.
pub fn check_readable(writer: &Schema, reader: &Schema) -> Result<(), String> {
    apache_avro::schema_compatibility::SchemaCompatibility::can_read(writer, reader).map_err(|e| {
        let mut reason = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            reason.push_str(": ");
            reason.push_str(&c.to_string());
            cause = c.source();
        }
        reason
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Kairos customer-event schema as JSON, to derive producer schemas from.
    fn customer_event_json() -> serde_json::Value {
        serde_json::from_str(CUSTOMER_EVENT).unwrap()
    }

    fn parse(v: &serde_json::Value) -> Schema {
        Schema::parse(v).unwrap()
    }

    fn fields(v: &mut serde_json::Value) -> &mut Vec<serde_json::Value> {
        v["fields"].as_array_mut().unwrap()
    }

    #[test]
    fn input_topics_are_found_with_or_without_the_prefix() {
        let site = input_contract("kairos.events.site", "kairos.").unwrap();
        assert_eq!(site.file, "customer_event.avsc");
        assert_eq!(
            input_contract("events.offline", "kairos.").unwrap().file,
            "offline_receipt.avsc"
        );
        assert!(input_contract("kairos.triggers", "kairos.").is_none());
        assert!(input_contract("other.events.site", "kairos.").is_none());
    }

    #[test]
    fn a_producer_schema_that_evolved_compatibly_is_readable() {
        let reader = customer_event();
        // The contract itself.
        assert_eq!(check_readable(reader, reader), Ok(()));
        // A producer field Kairos does not know is skipped.
        let mut extra = customer_event_json();
        fields(&mut extra).push(serde_json::json!({"name": "ab_bucket", "type": "string"}));
        assert_eq!(check_readable(&parse(&extra), reader), Ok(()));
        // An optional field the producer never sends takes Kairos's default.
        let mut fewer = customer_event_json();
        let before = fields(&mut fewer).len();
        fields(&mut fewer).retain(|f| f["name"] != "search_query");
        assert_eq!(fields(&mut fewer).len(), before - 1);
        assert_eq!(check_readable(&parse(&fewer), reader), Ok(()));
    }

    #[test]
    fn a_producer_schema_kairos_cannot_read_is_named_with_the_field() {
        let reader = customer_event();
        // A required field missing: Kairos has no default for it.
        let mut no_id = customer_event_json();
        fields(&mut no_id).retain(|f| f["name"] != "event_id");
        let reason = check_readable(&parse(&no_id), reader).unwrap_err();
        assert!(reason.contains("'event_id'"), "{reason}");
        assert!(reason.contains("default"), "{reason}");
        // A field whose type changed in a way resolution cannot bridge.
        let mut stringly = customer_event_json();
        for f in fields(&mut stringly) {
            if f["name"] == "occurred_at" {
                f["type"] = serde_json::json!("string");
            }
        }
        let reason = check_readable(&parse(&stringly), reader).unwrap_err();
        assert!(reason.contains("'occurred_at'"), "{reason}");
        // An event type Kairos has no symbol for.
        let mut new_type = customer_event_json();
        for f in fields(&mut new_type) {
            if f["name"] == "event_type" {
                let symbols = f["type"]["symbols"].as_array_mut().unwrap();
                symbols.push(serde_json::json!("loyalty_points_redeemed"));
            }
        }
        let reason = check_readable(&parse(&new_type), reader).unwrap_err();
        assert!(reason.contains("'event_type'"), "{reason}");
    }
}
