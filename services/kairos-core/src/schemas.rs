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
