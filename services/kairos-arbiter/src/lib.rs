//! The arbiter: decides, per customer and trigger, whether to send now, on which
//! channel, or not at all, and records why.
//!
//! Every trigger yields exactly one decision on the decisions topic; a "sent" decision
//! also yields a send command on the channel's topic. Decisions and send ids are
//! deterministic, so a replayed trigger produces the same records.

use std::sync::Arc;

use kairos_core::admin::AdminState;
use kairos_core::config::{topics, Config};
use std::collections::BTreeMap;

use anyhow::Context as _;
use kairos_core::calendar;
use kairos_core::contracts::{
    Channel, Decision, DecisionOutcome, MessageCategory, Outcome, OutcomeKind, SendCommand,
    Trigger, DECISION_RULES,
};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::{deterministic_id, stable_fraction};
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::{Millis, DAY, HOUR};
use prometheus::{Histogram, IntCounterVec};
use serde::{Deserialize, Serialize};

/// Per-customer arbiter state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CustomerLedger {
    /// Recent sends (time, channel, category), newest last; pruned to the cap window.
    pub sends: Vec<(Millis, Channel, MessageCategory)>,
    /// Channels the customer unsubscribed from (outcome time): suppressed for good.
    pub unsubscribed: BTreeMap<Channel, Millis>,
    /// Addresses that bounced hard, per channel: never sent to again.
    pub hard_bounced: BTreeMap<Channel, String>,
    /// When the customer marked a message as spam: no promo from then on.
    pub complained_at: Option<Millis>,
}

impl CustomerLedger {
    /// Folds a delivery or engagement outcome into the suppressions.
    pub fn apply_outcome(&mut self, o: &Outcome, address: Option<String>) {
        match o.kind {
            OutcomeKind::unsubscribed => {
                self.unsubscribed.entry(o.channel).or_insert(o.occurred_at);
            }
            OutcomeKind::bounced_hard => {
                if let Some(address) = address {
                    self.hard_bounced.insert(o.channel, address);
                }
            }
            OutcomeKind::complained => {
                self.complained_at.get_or_insert(o.occurred_at);
            }
            _ => {}
        }
    }

    /// Why `channel` must not be used for this customer at `address`, if it must not.
    fn channel_block(&self, channel: Channel, address: Option<&str>) -> Option<&'static str> {
        if self.unsubscribed.contains_key(&channel) {
            return Some("unsubscribed");
        }
        match (self.hard_bounced.get(&channel), address) {
            (Some(bounced), Some(address)) if bounced == address => Some("hard_bounce"),
            _ => None,
        }
    }
}

/// What the arbiter consumes.
pub enum ArbiterInput {
    Trigger(Box<Trigger>),
    Outcome(Box<Outcome>),
}

/// How long sends are remembered: the longest cap window.
const WEEK: Millis = 7 * DAY;

pub struct ArbiterProcessor {
    config: Arc<Config>,
    default_zone: chrono_tz::Tz,
    triggers_topic: String,
    outcomes_topic: String,
    decisions_topic: String,
    decisions: IntCounterVec,
    end_to_end: Histogram,
}

impl ArbiterProcessor {
    pub fn new(config: Arc<Config>, registry: &prometheus::Registry) -> Self {
        let processor = ArbiterProcessor {
            default_zone: calendar::zone(Some(&config.arbiter.default_time_zone)),
            triggers_topic: config.topic(topics::TRIGGERS),
            outcomes_topic: config.topic(topics::OUTCOMES),
            decisions_topic: config.topic(topics::DECISIONS),
            decisions: metrics::counter_vec(
                registry,
                "kairos_arbiter_decisions_total",
                "Arbiter decisions, by outcome and the rule that made them.",
                &["outcome", "rule"],
            ),
            end_to_end: metrics::histogram(
                registry,
                "kairos_end_to_end_latency_seconds",
                "From the customer event that caused a trigger to its send command.",
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
                ],
            ),
            config,
        };
        for (outcome, rule) in DECISION_RULES {
            processor
                .decisions
                .with_label_values(&[outcome.as_str(), rule]);
        }
        processor
    }

    fn in_control_group(&self, customer_id: &str) -> bool {
        let pct = f64::from(self.config.arbiter.control_group_percent) / 100.0;
        stable_fraction(&[&self.config.arbiter.control_group_salt, customer_id]) < pct
    }

    /// The scenario's own holdout, drawn independently of the global control group.
    fn in_scenario_holdout(&self, scenario: &str, customer_id: &str) -> Option<u8> {
        let pct = self
            .config
            .scenarios
            .iter()
            .find(|s| s.name == scenario)
            .map_or(0, |s| s.holdout_percent);
        let salt = &self.config.arbiter.control_group_salt;
        (pct > 0
            && stable_fraction(&[salt, "holdout", scenario, customer_id]) < f64::from(pct) / 100.0)
            .then_some(pct)
    }

    fn decide(&self, ctx: &mut Ctx<'_>, t: &Trigger, ledger: &mut CustomerLedger) -> Verdict {
        let now = ctx.now();
        if t.valid_until < now {
            return Verdict::no(
                DecisionOutcome::expired,
                "valid_until",
                format!("valid until {} but decided at {now}", t.valid_until),
            );
        }
        let marketing = t.category != MessageCategory::transactional;
        if marketing && self.in_control_group(&t.customer_id) {
            return Verdict::no(
                DecisionOutcome::held_out,
                "control_group",
                format!(
                    "customer is in the {}% global control group",
                    self.config.arbiter.control_group_percent
                ),
            );
        }
        if marketing {
            if let Some(pct) = self.in_scenario_holdout(&t.scenario, &t.customer_id) {
                return Verdict::no(
                    DecisionOutcome::held_out,
                    "scenario_holdout",
                    format!("customer is in the scenario's {pct}% holdout"),
                );
            }
        }
        if t.category == MessageCategory::promo {
            if let Some(at) = ledger.complained_at {
                return Verdict::no(
                    DecisionOutcome::suppressed,
                    "complaint",
                    format!("the customer marked a message as spam at {at}: no promo"),
                );
            }
        }
        ledger.sends.retain(|(at, _, _)| now - at < WEEK);
        if marketing {
            if let Some(v) = self.pacing(now, t, ledger) {
                return v;
            }
        }
        self.choose_channel(t, ledger)
    }

    /// Quiet hours, the minimum gap and the caps: a message that must wait is deferred
    /// to the moment the rule allows it (never dropped for that alone).
    fn pacing(&self, now: Millis, t: &Trigger, ledger: &CustomerLedger) -> Option<Verdict> {
        let a = &self.config.arbiter;
        let tz = calendar::zone_or(t.contacts.time_zone.as_deref(), self.default_zone);
        if let (Some((start, end)), Some(local)) = (a.quiet_hours(), calendar::local_time(now, tz))
        {
            if calendar::within_window(local, start, end) {
                // Fail closed: a local time the zone cannot map waits an hour.
                let until = calendar::next_local_time(now, tz, end).unwrap_or(now + HOUR);
                return Some(Verdict::defer(
                    until,
                    "quiet_hours",
                    format!("{local} in {tz} is within the quiet hours {start}-{end}"),
                ));
            }
        }
        let sent: Vec<Millis> = ledger
            .sends
            .iter()
            .filter(|(_, _, c)| *c != MessageCategory::transactional)
            .map(|(at, _, _)| *at)
            .collect();
        let gap = a.min_gap.as_millis() as Millis;
        if let Some(last) = sent
            .iter()
            .max()
            .filter(|last| gap > 0 && now - **last < gap)
        {
            return Some(Verdict::defer(
                last + gap,
                "min_gap",
                format!(
                    "the last message went out at {last}; the minimum gap is {:?}",
                    a.min_gap
                ),
            ));
        }
        let today = calendar::local_date(now, tz);
        let today_count = sent
            .iter()
            .filter(|at| calendar::local_date(**at, tz) == today)
            .count();
        if today_count >= a.daily_cap as usize {
            let until = calendar::start_of_next_local_day(now, tz).unwrap_or(now + HOUR);
            return Some(Verdict::defer(
                until,
                "frequency_cap_daily",
                format!("{today_count} messages today in {tz} (cap {})", a.daily_cap),
            ));
        }
        if sent.len() >= a.weekly_cap as usize {
            // Sends are kept for 7 days: the oldest leaving the window frees a slot.
            let oldest = sent.iter().min().copied().unwrap_or(now);
            return Some(Verdict::defer(
                oldest + WEEK,
                "frequency_cap_weekly",
                format!(
                    "{} messages in the last 7 days (cap {})",
                    sent.len(),
                    a.weekly_cap
                ),
            ));
        }
        None
    }

    fn choose_channel(&self, t: &Trigger, ledger: &CustomerLedger) -> Verdict {
        let consented = |c: &Channel| t.contacts.consented_channels.contains(c);
        let reachable = |c: &Channel| {
            matches!(c, Channel::in_app | Channel::webhook) || t.contacts.address_for(*c).is_some()
        };
        let mut blocked = None;
        let usable = |c: &&Channel| {
            if !(consented(c) && reachable(c)) {
                return false;
            }
            match ledger.channel_block(**c, t.contacts.address_for(**c).as_deref()) {
                Some(rule) => {
                    blocked.get_or_insert(rule);
                    false
                }
                None => true,
            }
        };
        match t.channels.iter().find(usable) {
            Some(c) => Verdict {
                outcome: DecisionOutcome::sent,
                channel: Some(*c),
                rule: "channel_choice",
                reason: format!(
                    "first channel of {:?} with consent and an address",
                    t.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>()
                ),
                defer_until: None,
            },
            None => match blocked {
                Some(rule) => Verdict::no(
                    DecisionOutcome::suppressed,
                    rule,
                    format!("every channel with consent and an address is suppressed ({rule})"),
                ),
                None => Verdict::no(
                    DecisionOutcome::suppressed,
                    "no_consented_channel",
                    "no channel of the scenario has both consent and an address".to_string(),
                ),
            },
        }
    }
}

/// What the policy decided for one trigger, and why.
struct Verdict {
    outcome: DecisionOutcome,
    channel: Option<Channel>,
    rule: &'static str,
    reason: String,
    /// For a deferred trigger: when to decide again.
    defer_until: Option<Millis>,
}

impl Verdict {
    fn no(outcome: DecisionOutcome, rule: &'static str, reason: String) -> Self {
        Verdict {
            outcome,
            channel: None,
            rule,
            reason,
            defer_until: None,
        }
    }

    fn defer(until: Millis, rule: &'static str, reason: String) -> Self {
        Verdict {
            outcome: DecisionOutcome::deferred,
            channel: None,
            rule,
            reason,
            defer_until: Some(until),
        }
    }
}

impl ArbiterProcessor {
    /// Suppressions from outcomes: an unsubscribe, a hard bounce or a complaint holds
    /// from the moment the arbiter sees it.
    fn apply_outcome(&mut self, ctx: &mut Ctx<'_>, o: &Outcome) -> anyhow::Result<()> {
        if !matches!(
            o.kind,
            OutcomeKind::unsubscribed | OutcomeKind::bounced_hard | OutcomeKind::complained
        ) {
            return Ok(());
        }
        let ledger_key = format!("c/{}", o.customer_id);
        let mut ledger: CustomerLedger = ctx.get(&ledger_key)?.unwrap_or_default();
        // The bounced address is the one the send went to, which the arbiter recorded.
        let address = ctx.get::<String>(&format!("a/{}", o.send_id))?;
        ledger.apply_outcome(o, address);
        ctx.put(&ledger_key, &ledger)
    }

    /// Emits a decision on the decisions topic and counts it.
    fn record_decision(
        &self,
        ctx: &mut Ctx<'_>,
        t: &Trigger,
        decision_id: String,
        (outcome, channel, send_id): (DecisionOutcome, Option<Channel>, Option<String>),
        rule: &str,
        reason: String,
    ) {
        let decision = Decision {
            decision_id,
            trigger_id: t.trigger_id.clone(),
            customer_id: t.customer_id.clone(),
            scenario: t.scenario.clone(),
            category: t.category,
            outcome,
            channel,
            send_id,
            rule: rule.to_string(),
            reason,
            decided_at: ctx.now(),
        };
        self.decisions
            .with_label_values(&[outcome.as_str(), rule])
            .inc();
        ctx.emit(&self.decisions_topic, &t.customer_id, &decision);
    }

    /// Decides a trigger: one arriving (`queued` false) or one whose deferral ended.
    fn decide_trigger(
        &mut self,
        ctx: &mut Ctx<'_>,
        t: Trigger,
        queued: bool,
    ) -> anyhow::Result<()> {
        // One trigger id, one final decision: a re-delivered trigger is ignored.
        let seen_key = format!("t/{}", t.trigger_id);
        if !queued {
            if ctx.get::<Millis>(&seen_key)?.is_some() {
                self.decisions
                    .with_label_values(&[DecisionOutcome::duplicate.as_str(), "trigger_id"])
                    .inc();
                return Ok(());
            }
            ctx.put(&seen_key, &ctx.now())?;
        }
        let ledger_key = format!("c/{}", t.customer_id);
        let mut ledger: CustomerLedger = ctx.get(&ledger_key)?.unwrap_or_default();
        let Verdict {
            outcome,
            channel,
            rule,
            reason,
            defer_until,
        } = self.decide(ctx, &t, &mut ledger);
        let now = ctx.now();
        if let Some(until) = defer_until {
            // The queue is the timer index: the trigger waits in state until the rule
            // allows it, or until its valid-until, when it is decided "expired".
            let wake = until.min(t.valid_until + 1);
            ctx.schedule(&format!("defer/{}", t.trigger_id), wake, &t)?;
            self.record_decision(
                ctx,
                &t,
                deterministic_id(&[&t.trigger_id, "deferred", &wake.to_string()]),
                (outcome, None, None),
                rule,
                format!("{reason}; decided again at {wake}"),
            );
            return ctx.put(&ledger_key, &ledger);
        }
        let send_id = channel.map(|c| deterministic_id(&[&t.trigger_id, c.as_str()]));
        if let (Some(c), Some(send_id)) = (channel, &send_id) {
            let cmd = SendCommand {
                send_id: send_id.clone(),
                trigger_id: t.trigger_id.clone(),
                customer_id: t.customer_id.clone(),
                scenario: t.scenario.clone(),
                channel: c,
                category: t.category,
                template: t.template.clone(),
                address: t.contacts.address_for(c),
                variables: t.variables.clone(),
                created_at: now,
                valid_until: t.valid_until,
                cause_occurred_at: t.cause_occurred_at,
                reasons: vec![format!("{rule}: {reason}")],
            };
            if let Some(address) = &cmd.address {
                ctx.put(&format!("a/{send_id}"), address)?;
            }
            let topic = self.config.send_topic(c);
            ctx.emit(&topic, &t.customer_id, &cmd);
            ledger.sends.push((now, c, t.category));
            self.end_to_end
                .observe(((now - t.cause_occurred_at).max(0) as f64) / 1000.0);
        }
        self.record_decision(
            ctx,
            &t,
            deterministic_id(&[&t.trigger_id, "decision"]),
            (outcome, channel, send_id),
            rule,
            reason,
        );
        ctx.put(&ledger_key, &ledger)
    }
}

impl Processor for ArbiterProcessor {
    type Input = ArbiterInput;

    fn name(&self) -> &str {
        "arbiter"
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.triggers_topic.clone(), self.outcomes_topic.clone()]
    }

    fn outputs(&self) -> Vec<String> {
        let mut topics = vec![self.decisions_topic.clone()];
        topics.extend(
            self.config
                .delivery
                .keys()
                .map(|c| self.config.send_topic(*c)),
        );
        topics
    }

    fn decode(&self, record: &Record<'_>) -> Result<ArbiterInput, Rejection> {
        if record.topic == self.outcomes_topic {
            Ok(ArbiterInput::Outcome(Box::new(decode_internal(
                record.payload,
            )?)))
        } else {
            Ok(ArbiterInput::Trigger(Box::new(decode_internal(
                record.payload,
            )?)))
        }
    }

    fn event_time(&self, input: &ArbiterInput) -> Option<Millis> {
        Some(match input {
            ArbiterInput::Trigger(t) => t.fired_at,
            ArbiterInput::Outcome(o) => o.occurred_at,
        })
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: ArbiterInput) -> anyhow::Result<()> {
        match input {
            ArbiterInput::Trigger(t) => self.decide_trigger(ctx, *t, false),
            ArbiterInput::Outcome(o) => self.apply_outcome(ctx, &o),
        }
    }

    /// A deferred trigger's wait is over: decide it again.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let t: Trigger = serde_json::from_slice(&timer.payload)
            .with_context(|| format!("deferred trigger {} does not decode", timer.timer_id))?;
        self.decide_trigger(ctx, t, true)
    }
}

/// Runs the arbiter until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let processor = ArbiterProcessor::new(config.clone(), &admin.registry);
    let registry = SchemaRegistry::new(None);
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}
