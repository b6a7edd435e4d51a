//! The profile processor: per-customer state and the sense of occasion.
//!
//! Reads site, app and offline events (co-partitioned, keyed by customer id), keeps one
//! profile per customer in the partition's RocksDB store, and turns occasions declared
//! in `[[scenarios]]` into triggers. Waits ("30 minutes after the cart was left") are
//! persistent timers, so they survive restarts and fire without new input.

use std::sync::Arc;

use anyhow::Context as _;
use kairos_core::config::{topics, Config, ScenarioConfig, ScenarioKind};
use kairos_core::contracts::{
    Channel, Contacts, CustomerEvent, DeadLetterReason, EventType, LineItem, OfflineReceipt,
    ReceiptKind, Trigger,
};
use kairos_core::encoding::{decode_input, Rejection, SchemaRegistry};
use kairos_core::ids::deterministic_id;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::schemas;
use kairos_core::store::DueTimer;
use kairos_core::time::Millis;
use serde::{Deserialize, Serialize};

pub mod profile;

use profile::CustomerProfile;

/// A decoded input of the profile processor.
#[derive(Debug, Clone)]
pub enum ProfileInput {
    Event(Box<CustomerEvent>),
    Receipt(Box<OfflineReceipt>),
}

/// What a scenario timer remembers about its cause.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScenarioTimer {
    scenario: String,
    customer_id: String,
    cause_event_id: String,
    cause_occurred_at: Millis,
}

pub struct ProfileProcessor {
    config: Arc<Config>,
    registry: SchemaRegistry,
    site_topic: String,
    app_topic: String,
    offline_topic: String,
    triggers_topic: String,
}

impl ProfileProcessor {
    pub fn new(config: Arc<Config>, registry: SchemaRegistry) -> Self {
        ProfileProcessor {
            site_topic: config.topic(topics::SITE_EVENTS),
            app_topic: config.topic(topics::APP_EVENTS),
            offline_topic: config.topic(topics::OFFLINE_EVENTS),
            triggers_topic: config.topic(topics::TRIGGERS),
            config,
            registry,
        }
    }

    fn scenarios(&self, kind: ScenarioKind) -> impl Iterator<Item = &ScenarioConfig> {
        self.config
            .scenarios
            .iter()
            .filter(move |s| s.enabled && s.kind == kind)
    }

    fn apply_event(&self, ctx: &mut Ctx<'_>, e: &CustomerEvent) -> anyhow::Result<()> {
        let customer_id = customer_key(e).unwrap_or_default();
        let key = profile_key(&customer_id);
        let mut p: CustomerProfile = ctx
            .get(&key)?
            .unwrap_or_else(|| CustomerProfile::new(&customer_id, e.occurred_at));
        p.touch(e);
        match e.event_type {
            EventType::registration => {
                p.registered_at.get_or_insert(e.occurred_at);
                for s in self.scenarios(ScenarioKind::Welcome) {
                    schedule_scenario(ctx, s, &customer_id, e)?;
                }
            }
            EventType::add_to_cart | EventType::remove_from_cart => {
                // Topics are consumed independently, so a purchase (say, an offline
                // receipt) may arrive before the cart change it followed. A cart change
                // older than the last purchase belongs to a cart that was bought.
                if p.last_purchase_at.is_some_and(|at| at >= e.occurred_at) {
                    return ctx.put(&key, &p);
                }
                p.update_cart(e);
                for s in self.scenarios(ScenarioKind::AbandonedCart) {
                    if p.cart.is_empty() {
                        ctx.cancel(&timer_id(&s.name, &customer_id))?;
                    } else {
                        // Every cart change restarts the wait.
                        schedule_scenario(ctx, s, &customer_id, e)?;
                    }
                }
            }
            EventType::purchase => {
                let total = e
                    .order
                    .as_ref()
                    .and_then(|o| o.total)
                    .unwrap_or_else(|| items_value(&e.items));
                p.record_purchase(e.occurred_at, total, false);
                self.purchase_ends_cart(ctx, &customer_id)?;
            }
            _ => {}
        }
        ctx.put(&key, &p)
    }

    fn apply_receipt(&self, ctx: &mut Ctx<'_>, r: &OfflineReceipt) -> anyhow::Result<()> {
        let customer_id = receipt_customer_key(r).unwrap_or_default();
        let key = profile_key(&customer_id);
        let mut p: CustomerProfile = ctx
            .get(&key)?
            .unwrap_or_else(|| CustomerProfile::new(&customer_id, r.occurred_at));
        match r.kind {
            ReceiptKind::sale => {
                p.record_purchase(r.occurred_at, r.total, true);
                // An offline purchase ends the online cart reminder too.
                self.purchase_ends_cart(ctx, &customer_id)?;
            }
            ReceiptKind::refund => p.record_return(r.total),
        }
        if let Some(phone) = &r.phone {
            p.phone.get_or_insert_with(|| phone.clone());
        }
        ctx.put(&key, &p)
    }

    fn purchase_ends_cart(&self, ctx: &mut Ctx<'_>, customer_id: &str) -> anyhow::Result<()> {
        // The cart itself is cleared by `record_purchase`.
        for s in self.scenarios(ScenarioKind::AbandonedCart) {
            ctx.cancel(&timer_id(&s.name, customer_id))?;
        }
        Ok(())
    }
}

fn profile_key(customer_id: &str) -> String {
    format!("c/{customer_id}")
}

fn timer_id(scenario: &str, customer_id: &str) -> String {
    format!("{scenario}/{customer_id}")
}

fn schedule_scenario(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    customer_id: &str,
    cause: &CustomerEvent,
) -> anyhow::Result<()> {
    let fire_at = cause.occurred_at + s.delay.as_millis() as Millis;
    ctx.schedule(
        &timer_id(&s.name, customer_id),
        fire_at,
        &ScenarioTimer {
            scenario: s.name.clone(),
            customer_id: customer_id.to_string(),
            cause_event_id: cause.event_id.clone(),
            cause_occurred_at: cause.occurred_at,
        },
    )
}

/// The key a customer's state lives under: the customer id, or the anonymous id for
/// visitors not yet identified.
fn customer_key(e: &CustomerEvent) -> Option<String> {
    e.customer_id
        .clone()
        .or_else(|| e.anonymous_id.clone().map(|a| format!("anon:{a}")))
        .filter(|k| !k.is_empty())
}

fn receipt_customer_key(r: &OfflineReceipt) -> Option<String> {
    r.customer_id
        .clone()
        .or_else(|| r.loyalty_card.clone().map(|c| format!("card:{c}")))
        .filter(|k| !k.is_empty())
}

fn items_value(items: &[LineItem]) -> f64 {
    items
        .iter()
        .map(|i| i.unit_price * f64::from(i.quantity))
        .sum()
}

/// Checks what the schema cannot express.
fn validate_event(e: &CustomerEvent) -> Result<(), Rejection> {
    if e.event_id.trim().is_empty() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            "event_id is empty",
        ));
    }
    if e.event_type != EventType::heartbeat && customer_key(e).is_none() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            "customer_id or anonymous_id is required",
        ));
    }
    let needs_product = matches!(
        e.event_type,
        EventType::add_to_cart | EventType::remove_from_cart
    );
    if needs_product && e.product.is_none() && e.items.is_empty() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            format!("{} needs product or items", e.event_type.as_str()),
        ));
    }
    if e.event_type == EventType::consent_change && e.consent.is_none() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            "consent_change needs consent",
        ));
    }
    Ok(())
}

impl Processor for ProfileProcessor {
    type Input = ProfileInput;

    fn name(&self) -> &str {
        "profile"
    }

    fn inputs(&self) -> Vec<String> {
        vec![
            self.site_topic.clone(),
            self.app_topic.clone(),
            self.offline_topic.clone(),
        ]
    }

    fn decode(&self, record: &Record<'_>) -> Result<ProfileInput, Rejection> {
        if record.topic == self.offline_topic {
            let r: OfflineReceipt =
                decode_input(record.payload, schemas::offline_receipt(), &self.registry)?;
            if receipt_customer_key(&r).is_none() {
                return Err(Rejection::new(
                    DeadLetterReason::missing_field,
                    "receipt needs customer_id or loyalty_card",
                ));
            }
            if r.event_id.trim().is_empty() {
                return Err(Rejection::new(
                    DeadLetterReason::missing_field,
                    "event_id is empty",
                ));
            }
            Ok(ProfileInput::Receipt(Box::new(r)))
        } else {
            let e: CustomerEvent =
                decode_input(record.payload, schemas::customer_event(), &self.registry)?;
            validate_event(&e)?;
            Ok(ProfileInput::Event(Box::new(e)))
        }
    }

    fn event_time(&self, input: &ProfileInput) -> Option<Millis> {
        Some(match input {
            ProfileInput::Event(e) => e.occurred_at,
            ProfileInput::Receipt(r) => r.occurred_at,
        })
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: ProfileInput) -> anyhow::Result<()> {
        match input {
            ProfileInput::Event(e) if e.event_type == EventType::heartbeat => Ok(()),
            ProfileInput::Event(e) => self.apply_event(ctx, &e),
            ProfileInput::Receipt(r) => self.apply_receipt(ctx, &r),
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let t: ScenarioTimer = serde_json::from_slice(&timer.payload)
            .with_context(|| format!("timer {} payload does not decode", timer.timer_id))?;
        let Some(scenario) = self.config.scenario(&t.scenario) else {
            tracing::warn!(scenario = %t.scenario, "timer for a scenario no longer configured");
            return Ok(());
        };
        let Some(p) = ctx.get::<CustomerProfile>(&profile_key(&t.customer_id))? else {
            return Ok(());
        };
        let bought_since = p
            .last_purchase_at
            .is_some_and(|at| at >= t.cause_occurred_at);
        if scenario.kind == ScenarioKind::AbandonedCart && (p.cart.is_empty() || bought_since) {
            return Ok(());
        }
        let fired_at = timer.fire_at;
        let trigger = Trigger {
            trigger_id: deterministic_id(&[&scenario.name, &t.customer_id, &t.cause_event_id]),
            scenario: scenario.name.clone(),
            customer_id: t.customer_id.clone(),
            category: scenario.category,
            step: 0,
            template: scenario.template.clone(),
            channels: scenario.channels.clone(),
            priority: scenario.priority,
            fired_at,
            valid_until: fired_at + scenario.valid_for.as_millis() as Millis,
            cause_event_id: Some(t.cause_event_id.clone()),
            cause_occurred_at: t.cause_occurred_at,
            contacts: contacts(&p),
            variables: p.template_variables().to_string(),
        };
        let topic = self.triggers_topic.clone();
        ctx.emit(&topic, &t.customer_id, &trigger);
        Ok(())
    }
}

fn contacts(p: &CustomerProfile) -> Contacts {
    Contacts {
        email: p.email.clone(),
        phone: p.phone.clone(),
        push_token: p.push_token.clone(),
        messenger_id: p.messenger_id.clone(),
        time_zone: p.time_zone.clone(),
        consented_channels: Channel::ALL
            .into_iter()
            .filter(|c| p.consents.get(c).copied().unwrap_or(false))
            .collect(),
    }
}

/// Runs the profile processor until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<kairos_core::admin::AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let registry = SchemaRegistry::new(config.schema_registry.url.clone());
    let processor = ProfileProcessor::new(config.clone(), registry.clone());
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}
