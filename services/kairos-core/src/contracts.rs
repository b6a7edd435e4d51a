//! The event contracts: the Rust side of `schemas/*.avsc`.
//!
//! Every type here derives `AvroSchema`; `tests/contracts.rs` proves that the derived
//! schema equals the file (Parsing Canonical Form) and that sample values round-trip
//! through the file schema. Enum variants are spelled exactly as the Avro symbols (and
//! the JSON strings), hence the snake_case variant names.
//!
//! Money is carried as `double` in the shop's currency, or in the currency an order or
//! receipt names (converted to `profile.currency` when read, if set): Kairos measures
//! revenue, it does not settle payments.
#![allow(non_camel_case_types)]

use std::collections::BTreeMap;

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};

/// An amount to the ten-thousandth it is compared at: floating-point sums of prices
/// fall a hair short of round boundaries (91.85 + 108.74 + ... is 499.99999999999994).
pub fn round_money(amount: f64) -> f64 {
    (amount * 10_000.0).round() / 10_000.0
}

/// Namespace of every Kairos schema.
pub const NAMESPACE: &str = "io.kairos";

/// What a customer did. Site and app events share one schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum EventType {
    page_view,
    product_view,
    search,
    add_to_cart,
    remove_from_cart,
    checkout_started,
    purchase,
    registration,
    login,
    consent_change,
    profile_update,
    wishlist_add,
    wishlist_remove,
    app_open,
    push_opened,
    in_app_interaction,
    order_status,
    heartbeat,
}

impl EventType {
    /// Every event type, for metrics that start at zero.
    pub const ALL: [EventType; 18] = [
        EventType::page_view,
        EventType::product_view,
        EventType::search,
        EventType::add_to_cart,
        EventType::remove_from_cart,
        EventType::checkout_started,
        EventType::purchase,
        EventType::registration,
        EventType::login,
        EventType::consent_change,
        EventType::profile_update,
        EventType::wishlist_add,
        EventType::wishlist_remove,
        EventType::app_open,
        EventType::push_opened,
        EventType::in_app_interaction,
        EventType::order_status,
        EventType::heartbeat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::page_view => "page_view",
            EventType::product_view => "product_view",
            EventType::search => "search",
            EventType::add_to_cart => "add_to_cart",
            EventType::remove_from_cart => "remove_from_cart",
            EventType::checkout_started => "checkout_started",
            EventType::purchase => "purchase",
            EventType::registration => "registration",
            EventType::login => "login",
            EventType::consent_change => "consent_change",
            EventType::profile_update => "profile_update",
            EventType::wishlist_add => "wishlist_add",
            EventType::wishlist_remove => "wishlist_remove",
            EventType::app_open => "app_open",
            EventType::push_opened => "push_opened",
            EventType::in_app_interaction => "in_app_interaction",
            EventType::order_status => "order_status",
            EventType::heartbeat => "heartbeat",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum Platform {
    web,
    ios,
    android,
}

/// A delivery channel. `in_app` covers in-app and on-site messages.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, AvroSchema,
)]
#[avro(namespace = "io.kairos")]
pub enum Channel {
    email,
    sms,
    push,
    messenger,
    in_app,
    webhook,
}

impl Channel {
    pub const ALL: [Channel; 6] = [
        Channel::email,
        Channel::sms,
        Channel::push,
        Channel::messenger,
        Channel::in_app,
        Channel::webhook,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::email => "email",
            Channel::sms => "sms",
            Channel::push => "push",
            Channel::messenger => "messenger",
            Channel::in_app => "in_app",
            Channel::webhook => "webhook",
        }
    }

    pub fn parse(name: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct Product {
    pub product_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub price: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct LineItem {
    pub product_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default = "one")]
    pub quantity: i32,
    pub unit_price: f64,
}

fn one() -> i32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum OrderStatus {
    placed,
    shipped,
    delivered,
    returned,
    cancelled,
}

impl OrderStatus {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::placed => "placed",
            OrderStatus::shipped => "shipped",
            OrderStatus::delivered => "delivered",
            OrderStatus::returned => "returned",
            OrderStatus::cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct Order {
    pub order_id: String,
    #[serde(default)]
    pub total: Option<f64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub status: Option<OrderStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct ConsentChange {
    pub channel: Channel,
    pub granted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct ProfileUpdate {
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub birthday: Option<String>,
    #[serde(default)]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub push_token: Option<String>,
    #[serde(default)]
    pub messenger_id: Option<String>,
    #[serde(default)]
    pub subscription_ends_at: Option<i64>,
    /// Attributes the customer no longer has (a phone number removed, a plan without
    /// an end): an absent field and a null read the same, so clearing is named here.
    #[serde(default)]
    pub cleared: Vec<ProfileField>,
}

/// A profile attribute a `profile_update` can clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
#[allow(non_camel_case_types)]
pub enum ProfileField {
    first_name,
    last_name,
    birthday,
    time_zone,
    email,
    phone,
    push_token,
    messenger_id,
    subscription_ends_at,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum InteractionAction {
    opened,
    clicked,
    dismissed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct MessageInteraction {
    #[serde(default)]
    pub send_id: Option<String>,
    pub channel: Channel,
    pub action: InteractionAction,
}

/// One site or app event (topics `events.site` and `events.app`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct CustomerEvent {
    pub event_id: String,
    pub event_type: EventType,
    #[serde(deserialize_with = "crate::time::deserialize_millis")]
    pub occurred_at: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub anonymous_id: Option<String>,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub loyalty_card: Option<String>,
    #[serde(default)]
    pub page_url: Option<String>,
    #[serde(default)]
    pub search_query: Option<String>,
    #[serde(default)]
    pub product: Option<Product>,
    #[serde(default)]
    pub items: Vec<LineItem>,
    #[serde(default)]
    pub order: Option<Order>,
    #[serde(default)]
    pub consent: Option<ConsentChange>,
    #[serde(default)]
    pub profile: Option<ProfileUpdate>,
    #[serde(default)]
    pub interaction: Option<MessageInteraction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum ReceiptKind {
    sale,
    refund,
}

/// A till receipt from a physical store (topic `events.offline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct OfflineReceipt {
    pub event_id: String,
    #[serde(deserialize_with = "crate::time::deserialize_millis")]
    pub occurred_at: i64,
    pub receipt_id: String,
    pub kind: ReceiptKind,
    pub store_id: String,
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub loyalty_card: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    pub items: Vec<LineItem>,
    pub total: f64,
    pub currency: String,
}

/// A change to the product catalog (topic `catalog`, keyed by product id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct CatalogUpdate {
    pub event_id: String,
    #[serde(deserialize_with = "crate::time::deserialize_millis")]
    pub occurred_at: i64,
    pub product_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub price: Option<f64>,
    #[serde(default)]
    pub in_stock: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum SegmentKind {
    rfm,
    lifecycle,
}

/// A customer moved from one segment to another (topic `segment-transitions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct SegmentTransition {
    pub transition_id: String,
    pub customer_id: String,
    pub kind: SegmentKind,
    pub from_segment: Option<String>,
    pub to_segment: String,
    pub reason: String,
    pub occurred_at: i64,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, AvroSchema,
)]
#[avro(namespace = "io.kairos")]
pub enum MessageCategory {
    transactional,
    trigger,
    promo,
}

impl MessageCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageCategory::transactional => "transactional",
            MessageCategory::trigger => "trigger",
            MessageCategory::promo => "promo",
        }
    }
}

/// How the customer can be reached, as the profile knew it when the trigger fired.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct Contacts {
    pub email: Option<String>,
    pub phone: Option<String>,
    pub push_token: Option<String>,
    pub messenger_id: Option<String>,
    pub time_zone: Option<String>,
    pub consented_channels: Vec<Channel>,
}

impl Contacts {
    /// The address a send on `channel` goes to, if the customer has one.
    pub fn address(&self, channel: Channel) -> Option<&str> {
        match channel {
            Channel::email => self.email.as_deref(),
            Channel::sms => self.phone.as_deref(),
            Channel::push => self.push_token.as_deref(),
            Channel::messenger => self.messenger_id.as_deref(),
            // In-app and webhook messages are addressed by customer id.
            Channel::in_app | Channel::webhook => None,
        }
    }
}

/// An occasion to message a customer (topic `triggers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct Trigger {
    pub trigger_id: String,
    pub scenario: String,
    pub customer_id: String,
    pub category: MessageCategory,
    pub step: i32,
    pub template: String,
    pub channels: Vec<Channel>,
    pub priority: i32,
    pub fired_at: i64,
    pub valid_until: i64,
    pub cause_event_id: Option<String>,
    pub cause_occurred_at: i64,
    pub contacts: Contacts,
    pub variables: String,
    /// Customers merged into this one (identity resolution): the arbiter decides only
    /// once their ledgers are in, so their sends count and their suppressions hold.
    #[serde(default)]
    pub merged_from: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum DecisionOutcome {
    sent,
    deferred,
    suppressed,
    held_out,
    expired,
    cancelled,
    duplicate,
}

impl DecisionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionOutcome::sent => "sent",
            DecisionOutcome::deferred => "deferred",
            DecisionOutcome::suppressed => "suppressed",
            DecisionOutcome::held_out => "held_out",
            DecisionOutcome::expired => "expired",
            DecisionOutcome::cancelled => "cancelled",
            DecisionOutcome::duplicate => "duplicate",
        }
    }
}

/// Every (outcome, rule) pair the arbiter decides by: the bounded values of the `rule`
/// label, and the series metrics start at zero.
pub const DECISION_RULES: [(DecisionOutcome, &str); 46] = [
    (DecisionOutcome::cancelled, "chain_broken"),
    (DecisionOutcome::suppressed, "queue_full"),
    // A cascade step waiting for the gap or window after another message.
    (DecisionOutcome::deferred, "cascade_spacing"),
    (DecisionOutcome::cancelled, "scenario_off"),
    (DecisionOutcome::deferred, "scenario_off"),
    (DecisionOutcome::cancelled, "forgotten"),
    (DecisionOutcome::cancelled, "left_segment"),
    (DecisionOutcome::deferred, "chain_order"),
    (DecisionOutcome::deferred, "chain_spacing"),
    (DecisionOutcome::suppressed, "in_personal_chain"),
    (DecisionOutcome::cancelled, "became_active"),
    // A cascade step that would break a cap ends the cascade.
    (DecisionOutcome::suppressed, "frequency_cap_daily"),
    (DecisionOutcome::suppressed, "frequency_cap_weekly"),
    (DecisionOutcome::suppressed, "channel_cap"),
    (DecisionOutcome::suppressed, "category_cap"),
    (DecisionOutcome::suppressed, "scenario_cap"),
    (DecisionOutcome::cancelled, "merged"),
    // Handed over to the survivor of a merge, and taken over there.
    (DecisionOutcome::deferred, "merged"),
    (DecisionOutcome::deferred, "merge_pending"),
    (DecisionOutcome::suppressed, "sunset_inactive"),
    (DecisionOutcome::deferred, "channel_cap"),
    (DecisionOutcome::deferred, "category_cap"),
    (DecisionOutcome::deferred, "scenario_cap"),
    (DecisionOutcome::sent, "cascade"),
    (DecisionOutcome::cancelled, "cascade"),
    // A cascade step waiting for the message before it, put off by its server.
    (DecisionOutcome::deferred, "cascade"),
    (DecisionOutcome::deferred, "main_scenario"),
    (DecisionOutcome::suppressed, "main_scenario"),
    (DecisionOutcome::sent, "channel_choice"),
    (DecisionOutcome::cancelled, "purchase_exclusion"),
    (DecisionOutcome::suppressed, "pause_after_purchase"),
    (DecisionOutcome::deferred, "channel_conflict"),
    (DecisionOutcome::suppressed, "offer_repeat"),
    (DecisionOutcome::suppressed, "sunset"),
    (DecisionOutcome::held_out, "control_group"),
    (DecisionOutcome::held_out, "scenario_holdout"),
    (DecisionOutcome::deferred, "quiet_hours"),
    (DecisionOutcome::deferred, "min_gap"),
    (DecisionOutcome::deferred, "frequency_cap_daily"),
    (DecisionOutcome::deferred, "frequency_cap_weekly"),
    (DecisionOutcome::suppressed, "no_consented_channel"),
    (DecisionOutcome::suppressed, "unsubscribed"),
    (DecisionOutcome::suppressed, "hard_bounce"),
    (DecisionOutcome::suppressed, "complaint"),
    (DecisionOutcome::expired, "valid_until"),
    (DecisionOutcome::duplicate, "trigger_id"),
];

/// What the arbiter did with a trigger, and why (topic `decisions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct Decision {
    pub decision_id: String,
    pub trigger_id: String,
    pub customer_id: String,
    pub scenario: String,
    pub category: MessageCategory,
    pub outcome: DecisionOutcome,
    pub channel: Option<Channel>,
    pub send_id: Option<String>,
    pub rule: String,
    pub reason: String,
    pub decided_at: i64,
    /// The experiment group of the customer for this trigger, on a marketing trigger's
    /// final decision (whatever it was): lift is measured by the group assigned, not
    /// by the message received (intent to treat). None on the other decisions.
    #[serde(default)]
    pub group: Option<ExperimentGroup>,
}

/// The group a customer is in for a scenario: the global control group and the
/// scenario's holdout are `control`, everyone else `treatment`.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum ExperimentGroup {
    treatment,
    control,
}

impl ExperimentGroup {
    pub fn as_str(self) -> &'static str {
        match self {
            ExperimentGroup::treatment => "treatment",
            ExperimentGroup::control => "control",
        }
    }
}

/// A [`Decision`] that borrows its text, for the arbiter to write one without copying
/// what it already holds (the trigger's ids and scenario): the same fields in the same
/// order, so the same JSON (a test compares the bytes).
#[derive(Debug, Serialize)]
pub struct DecisionRef<'a> {
    pub decision_id: &'a str,
    pub trigger_id: &'a str,
    pub customer_id: &'a str,
    pub scenario: &'a str,
    pub category: MessageCategory,
    pub outcome: DecisionOutcome,
    pub channel: Option<Channel>,
    pub send_id: Option<&'a str>,
    pub rule: &'a str,
    pub reason: &'a str,
    pub decided_at: i64,
    pub group: Option<ExperimentGroup>,
}

/// A [`SendCommand`] that borrows its text (see [`DecisionRef`]): a send command copied
/// the trigger's template, variables and ids only to be written out.
#[derive(Debug, Serialize)]
pub struct SendCommandRef<'a> {
    pub send_id: &'a str,
    pub trigger_id: &'a str,
    pub customer_id: &'a str,
    pub scenario: &'a str,
    pub channel: Channel,
    pub category: MessageCategory,
    pub template: &'a str,
    pub address: Option<&'a str>,
    pub variables: &'a str,
    pub created_at: i64,
    pub valid_until: i64,
    pub cause_occurred_at: i64,
    pub reasons: &'a [&'a str],
}

/// An order to deliver one message (topics `send.<channel>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct SendCommand {
    pub send_id: String,
    pub trigger_id: String,
    pub customer_id: String,
    pub scenario: String,
    pub channel: Channel,
    pub category: MessageCategory,
    pub template: String,
    pub address: Option<String>,
    pub variables: String,
    pub created_at: i64,
    pub valid_until: i64,
    pub cause_occurred_at: i64,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum OutcomeKind {
    sent,
    delivered,
    failed,
    bounced_hard,
    bounced_soft,
    opened,
    clicked,
    unsubscribed,
    complained,
    /// The recipient's server put the message off (greylisting, a full mailbox): it is
    /// tried again later, and a `sent` (or `delivered`) or `failed` follows. Last, as
    /// symbols are only ever appended.
    deferred,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 10] = [
        OutcomeKind::sent,
        OutcomeKind::delivered,
        OutcomeKind::failed,
        OutcomeKind::bounced_hard,
        OutcomeKind::bounced_soft,
        OutcomeKind::opened,
        OutcomeKind::clicked,
        OutcomeKind::unsubscribed,
        OutcomeKind::complained,
        OutcomeKind::deferred,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::sent => "sent",
            OutcomeKind::delivered => "delivered",
            OutcomeKind::failed => "failed",
            OutcomeKind::bounced_hard => "bounced_hard",
            OutcomeKind::bounced_soft => "bounced_soft",
            OutcomeKind::opened => "opened",
            OutcomeKind::clicked => "clicked",
            OutcomeKind::unsubscribed => "unsubscribed",
            OutcomeKind::complained => "complained",
            OutcomeKind::deferred => "deferred",
        }
    }
}

/// What happened to a send (topic `outcomes`, keyed by customer id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct Outcome {
    pub outcome_id: String,
    pub send_id: String,
    pub customer_id: String,
    pub scenario: String,
    pub channel: Channel,
    pub category: MessageCategory,
    pub kind: OutcomeKind,
    pub reason: Option<String>,
    pub occurred_at: i64,
    /// The address the send went to, when the reporter knows it (delivery does, from
    /// the send command): a late hard bounce suppresses that one, not a newer one.
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum DeadLetterReason {
    not_json,
    bad_avro,
    unknown_schema_id,
    unknown_event_type,
    missing_field,
    invalid_field,
    empty_message,
    processing_error,
    /// An output record the broker refused for good (too large, invalid, a topic the
    /// service may not write): the letter holds the output, not an input.
    output_refused,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 9] = [
        DeadLetterReason::not_json,
        DeadLetterReason::bad_avro,
        DeadLetterReason::unknown_schema_id,
        DeadLetterReason::unknown_event_type,
        DeadLetterReason::missing_field,
        DeadLetterReason::invalid_field,
        DeadLetterReason::empty_message,
        DeadLetterReason::processing_error,
        DeadLetterReason::output_refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::not_json => "not_json",
            DeadLetterReason::bad_avro => "bad_avro",
            DeadLetterReason::unknown_schema_id => "unknown_schema_id",
            DeadLetterReason::unknown_event_type => "unknown_event_type",
            DeadLetterReason::missing_field => "missing_field",
            DeadLetterReason::invalid_field => "invalid_field",
            DeadLetterReason::empty_message => "empty_message",
            DeadLetterReason::processing_error => "processing_error",
            DeadLetterReason::output_refused => "output_refused",
        }
    }
}

/// A message that could not be processed, kept whole (topic `deadletter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct DeadLetter {
    pub dead_letter_id: String,
    pub service: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub reason_code: DeadLetterReason,
    pub reason: String,
    pub key_base64: Option<String>,
    pub payload_base64: String,
    pub failed_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum InterestKind {
    viewed,
    wishlisted,
    unwishlisted,
}

/// A customer's interest in a product (internal topic `product-interest`, keyed by
/// product id so the catalog join finds a product's audience without a scan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct ProductInterest {
    pub interest_id: String,
    pub customer_id: String,
    pub product_id: String,
    pub kind: InterestKind,
    pub price_seen: Option<f64>,
    pub occurred_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum ProductOccasionKind {
    price_drop,
    back_in_stock,
}

/// A catalog change that matters to one interested customer (internal topic
/// `product-occasions`, keyed by customer id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct ProductOccasion {
    pub occasion_id: String,
    pub customer_id: String,
    pub product_id: String,
    pub product_name: Option<String>,
    pub kind: ProductOccasionKind,
    pub old_price: Option<f64>,
    pub new_price: Option<f64>,
    pub cause_event_id: String,
    pub occurred_at: i64,
    /// With a drop: the lowest price of the 30 days before it (the prior price the
    /// EU's Omnibus directive has a price reduction state). Absent in occasions of
    /// earlier versions.
    #[serde(default)]
    pub lowest_price: Option<f64>,
}

/// What a customer did that ends or pauses messaging (internal topic
/// `customer-actions`, keyed by customer id): the profile emits it, the arbiter uses it
/// to drop queued messages the action made pointless and to pause promo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub struct CustomerAction {
    pub action_id: String,
    pub customer_id: String,
    pub kind: CustomerActionKind,
    pub order_id: Option<String>,
    /// The channel of an opt-in.
    #[serde(default)]
    pub channel: Option<Channel>,
    pub occurred_at: i64,
    /// `merged`: the customer this one now is part of.
    #[serde(default)]
    pub merged_into: Option<String>,
    /// `merge_in`: the merged customer's arbiter ledger (JSON), to combine.
    #[serde(default)]
    pub state: Option<String>,
    /// `merge_in`: the customer the ledger comes from.
    #[serde(default)]
    pub merged_from: Option<String>,
    /// `purchase`: a till sale, whose receipt may be uploaded hours late (so it does
    /// not end what was caused after it). Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub till_sale: bool,
    /// `left_segment`: the RFM segment or lifecycle stage the customer left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// `contacts_changed`: the customer's contacts, time zone and consents as of
    /// `occurred_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contacts: Option<Contacts>,
}

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.kairos")]
pub enum CustomerActionKind {
    /// An online order or an offline sale.
    purchase,
    /// The customer gave consent on `channel` again: an earlier unsubscribe ends.
    opt_in,
    /// The customer's first visit (site or app activity) of a UTC day.
    visit,
    /// The identity processor merged this customer into `merged_into`: the arbiter
    /// hands this customer's ledger over (keyed by the merged customer).
    merged,
    /// A merged customer's ledger arrives at the survivor (keyed by the survivor).
    merge_in,
    /// The customer withdrew consent on `channel`: nothing more goes out on it until
    /// a later opt-in, queued and cascading messages included.
    opt_out,
    /// The customer left `segment` (an RFM segment or a lifecycle stage a
    /// `segment_entered` scenario targets): what that scenario still has queued or
    /// cascading for them ends.
    left_segment,
    /// The profile forgot this anonymous customer (`identity.anonymous_retention`
    /// without an event): what waits for them ends and their ledger goes.
    forgotten,
    /// An outcome of a message sent to `merged_from`, merged into this customer
    /// before the outcome came, sent on by the arbiter (keyed by this customer; the
    /// outcome, named after this customer, is in `state`).
    outcome,
    /// An address or the time zone of the customer changed (`contacts`): a message
    /// waiting in the arbiter (a deferral, a cascade step) goes to the new address, in
    /// the new zone's hours.
    contacts_changed,
}

impl CustomerAction {
    /// An action with no order, channel or merge details; set the ones that apply with
    /// struct update syntax.
    pub fn new(
        action_id: String,
        customer_id: String,
        kind: CustomerActionKind,
        occurred_at: i64,
    ) -> Self {
        CustomerAction {
            action_id,
            customer_id,
            kind,
            order_id: None,
            channel: None,
            occurred_at,
            merged_into: None,
            state: None,
            merged_from: None,
            till_sale: false,
            segment: None,
            contacts: None,
        }
    }
}

/// How long the state of a merged customer (its profile, its ledger) is waited for by
/// the survivor's processors before they go on without it. Merges cross partitions in
/// seconds; one that has not come within an hour is not coming (its record went to the
/// dead-letter topic), and waiting on would hold even an order confirmation for good.
pub const MERGE_WAIT_LIMIT_MS: i64 = 60 * 60_000;

/// Two customer ids found to be one person: `from` joins `into` for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerMerge {
    pub merge_id: String,
    pub from: String,
    pub into: String,
    /// The identifier that proved it (`email:ann@example.com`).
    pub identifier: String,
    pub occurred_at: i64,
}

/// A trusted identifier (an e-mail, a phone) that came to customer `from` without
/// `from` presenting it (typed on their shared laptop by someone not logged in, or
/// brought by an anonymous profile stitched to them) was presented by `to`, whose it is
/// now: `from`'s profile stops using it as an address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentifierMoved {
    pub move_id: String,
    pub from: String,
    pub to: String,
    /// `email:ann@example.com`, normalized.
    pub identifier: String,
    pub occurred_at: i64,
}

/// A record of the internal topic `identified-events`, keyed by the customer it
/// belongs to.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "record")]
pub enum IdentifiedRecord {
    site(Box<CustomerEvent>),
    app(Box<CustomerEvent>),
    offline(Box<OfflineReceipt>),
    /// Keyed by `from`: its profile moves to `into`.
    merge(CustomerMerge),
    /// Keyed by `from`: an identifier of `from`'s moved to `to` (see [`IdentifierMoved`]).
    identifier_moved(IdentifierMoved),
    /// Keyed by `into`, ahead of the event that caused the merge: the survivor holds its
    /// triggers until the profile of `from` is in.
    merge_expected(CustomerMerge),
    /// Keyed by `into`: the profile of `from`, to combine with the survivor's.
    merge_in {
        merge: CustomerMerge,
        profile: serde_json::Value,
        /// Triggers the merged customer held while a merge into it was under way:
        /// the survivor holds them on, or sends them.
        #[serde(default)]
        held: Vec<Trigger>,
        /// Chain steps of the merged customer still to fire that its profile cannot
        /// rebuild (a segment trigger's next step, a birthday's follow-up): the
        /// profile processor's own timer records, carried on for the survivor.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        steps: Vec<serde_json::Value>,
        /// The sender carried every welcome, post-purchase, post-delivery, segment and
        /// yearly follow-up step it had still to fire in `steps`, so a chain not among
        /// them is not running (finished, ended, or stopped by a late step). Records
        /// of earlier versions lack it: the survivor rebuilds the welcome series, the
        /// review request and the NPS survey from the merged profile then.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chains_carried: bool,
        /// Orders of the merged customer marked returned (a return that came before
        /// its purchase): the survivor keeps the marks, so no follow-up of them fires.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        returned: Vec<String>,
    },
    /// Keyed by the survivor: an outcome of a message sent to a customer merged away
    /// before the outcome came (an open or an unsubscribe of an e-mail sent to the
    /// anonymous visitor the customer was), sent on by the profile processor with the
    /// survivor's `customer_id` and the outcome's own id.
    outcome(Box<Outcome>),
    /// Keyed by `into`: the attribution touches the feedback service kept for the
    /// merged customer `from`, sent on by it so the person's later purchases still
    /// find the messages sent before the merge (a cart reminder to the anonymous
    /// visitor who then logs in and buys).
    touches_in {
        merge: CustomerMerge,
        touches: serde_json::Value,
        /// The orders and till receipts counted for `from` within the deduplication
        /// window, so that a copy of one read for the survivor (a till file uploaded
        /// again once the card was registered) counts once.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        counted_orders: Vec<CountedOrder>,
    },
    /// Keyed by `into`: a purchase of the merged customer `from` that was still
    /// waiting to be attributed (`feedback.attribution_delay`) when the merge came,
    /// sent on by the feedback service after the merged customer's touches; counted
    /// already, it is only attributed there.
    purchase_in {
        merge: CustomerMerge,
        event_id: String,
        occurred_at: i64,
        value: f64,
    },
}

/// An order (`kind` "order") or till receipt ("receipt") the feedback service counted
/// for a customer, and since when it keeps it as counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountedOrder {
    pub kind: String,
    pub id: String,
    pub counted_at: i64,
}

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentityChangeKind {
    /// `merged_from` joined `customer_id`.
    merged,
    /// An identifier shared by more customers than allowed stopped linking.
    identifier_shared,
    /// An identifier already linked to another customer, not trusted to merge.
    conflict,
}

/// What the identity processor found (topic `identity-changes`, keyed by customer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityChange {
    pub change_id: String,
    pub kind: IdentityChangeKind,
    pub customer_id: String,
    #[serde(default)]
    pub merged_from: Option<String>,
    pub identifier: String,
    /// Customers that presented the identifier (for `identifier_shared`).
    #[serde(default)]
    pub customers: Vec<String>,
    pub occurred_at: i64,
}

/// Template variables are carried as a JSON object in a string field, so one schema
/// serves every template.
pub type Variables = BTreeMap<String, serde_json::Value>;

impl LineItem {
    /// The value of a list of items at their unit prices.
    pub fn total(items: &[LineItem]) -> f64 {
        items
            .iter()
            .map(|i| i.unit_price * f64::from(i.quantity))
            .sum()
    }
}

/// Prefixes of the customer ids Kairos names itself: profiles known only by a cookie,
/// device, card, phone or e-mail (`anon:…`), and the profile of a shared identifier
/// (`…#shared`). A producer's customer id of that form would join such a profile (a
/// `customer_id` of `anon:<cookie>` takes over that visitor's history), so input
/// with one is refused.
pub const RESERVED_CUSTOMER_ID_PREFIXES: [&str; 6] =
    ["anon:", "device:", "card:", "phone:", "email:", "customer:"];

/// See [`RESERVED_CUSTOMER_ID_PREFIXES`].
pub const SHARED_IDENTIFIER_SUFFIX: &str = "#shared";

/// Whether a producer may name a customer `id` (see [`RESERVED_CUSTOMER_ID_PREFIXES`]).
pub fn is_reserved_customer_id(id: &str) -> bool {
    RESERVED_CUSTOMER_ID_PREFIXES
        .iter()
        .any(|p| id.starts_with(p))
        || id.ends_with(SHARED_IDENTIFIER_SUFFIX)
}

/// An optional id field's value, none if absent or blank.
pub(crate) fn given(field: &Option<String>) -> Option<&str> {
    field.as_deref().filter(|v| !v.trim().is_empty())
}

/// The key of the profile an event or receipt goes to: its customer id, else the
/// first of its other ids given, tagged (`anon:`, `device:`; `card:`, `phone:`). Ids
/// are trimmed, as the profile reads them, and an empty one is absent:
/// `"customer_id": ""` must not hide the anonymous id beside it. Also what
/// `kairos replay` keys a bare line by, from the fields alone.
pub fn profile_key(customer_id: Option<&str>, others: [(&str, Option<&str>); 2]) -> Option<String> {
    fn id(id: Option<&str>) -> Option<&str> {
        id.map(str::trim).filter(|id| !id.is_empty())
    }
    id(customer_id).map(str::to_string).or_else(|| {
        (others.into_iter()).find_map(|(tag, other)| id(other).map(|other| [tag, other].concat()))
    })
}

impl CustomerEvent {
    /// The key a customer's state lives under: the customer id, or the anonymous or
    /// device id for visitors not yet identified ([`profile_key`]).
    pub fn customer_key(&self) -> Option<String> {
        profile_key(
            self.customer_id.as_deref(),
            [
                ("anon:", self.anonymous_id.as_deref()),
                ("device:", self.device_id.as_deref()),
            ],
        )
    }

    /// What a purchase event is worth: the order total, else the sum of its items.
    pub fn purchase_value(&self) -> f64 {
        self.order
            .as_ref()
            .and_then(|o| o.total)
            .unwrap_or_else(|| LineItem::total(&self.items))
    }
}

impl OfflineReceipt {
    /// The customer a receipt belongs to: the customer id, else the loyalty card, else
    /// the phone (as given; the identity processor resolves them properly).
    pub fn customer_key(&self) -> Option<String> {
        profile_key(
            self.customer_id.as_deref(),
            [
                ("card:", self.loyalty_card.as_deref()),
                ("phone:", self.phone.as_deref()),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_id_field_is_absent_and_does_not_hide_the_next_one() {
        let event = |ids: &str| -> CustomerEvent {
            serde_json::from_str(&format!(
                r#"{{"event_id":"e1","event_type":"page_view","occurred_at":1764950000000{ids}}}"#
            ))
            .expect("event")
        };
        let key = |ids: &str| event(ids).customer_key();
        assert_eq!(key(r#","customer_id":"c1""#).as_deref(), Some("c1"));
        assert_eq!(
            key(r#","customer_id":"","anonymous_id":"a1""#).as_deref(),
            Some("anon:a1")
        );
        assert_eq!(
            key(r#","customer_id":" ","anonymous_id":"","device_id":"d1""#).as_deref(),
            Some("device:d1")
        );
        assert_eq!(key(r#","customer_id":"","anonymous_id":"""#), None);
        let receipt = |ids: &str| -> OfflineReceipt {
            serde_json::from_str(&format!(
                r#"{{"event_id":"r1","receipt_id":"r1","kind":"sale","occurred_at":1764950000000,"store_id":"s1","total":1.0,"currency":"EUR","items":[]{ids}}}"#
            ))
            .expect("receipt")
        };
        assert_eq!(
            receipt(r#","customer_id":"","loyalty_card":"123""#)
                .customer_key()
                .as_deref(),
            Some("card:123")
        );
        assert_eq!(
            receipt(r#","customer_id":"","loyalty_card":"","phone":"+4930901820""#)
                .customer_key()
                .as_deref(),
            Some("phone:+4930901820")
        );
    }
}
