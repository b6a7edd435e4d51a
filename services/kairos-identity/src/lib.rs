//! The identity processor: one customer from cookies, devices, e-mails, phones and
//! loyalty cards.
//!
//! It reads the raw input topics, whatever identifier they are keyed by, normalizes the
//! identifiers each event carries (an invalid one sends the event to the dead-letter
//! topic), resolves the event to one customer id through the identifier graph, links
//! the identifiers it has not seen to that customer, and re-publishes the event on
//! `identified-events` keyed by the customer, where the profile processor reads it.
//!
//! Two profiles found to be one person merge: an anonymous visitor who logs in joins
//! the customer (their history counts), and two known customers merge when they share
//! an identifier trusted to prove it (`merge_on`). The survivor is chosen by rule; a
//! `merge` record keyed by the merged customer tells the profile (and through it the
//! arbiter) to hand that customer's state over. An identifier presented by more
//! customers than allowed (a family phone, a shop's test card) stops linking.
//!
//! The graph is one whole: any two events may link, whatever partitions they arrive
//! on. It lives in state partition 0 (see `Processor::single_state_partition`), with
//! the same exactly-once commit, changelog and outbox as every processor.

use std::sync::Arc;

use kairos_core::config::{topics, Config, SurvivorRule};
use kairos_core::contracts::{
    CustomerEvent, CustomerMerge, DeadLetterReason, EventType, IdentifiedRecord, IdentifierMoved,
    IdentityChange, IdentityChangeKind, OfflineReceipt, SHARED_IDENTIFIER_SUFFIX,
};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::identifiers::{Identifier, IdentifierKind, InvalidIdentifier, Normalizer};
use kairos_core::ids::deterministic_id;
use kairos_core::input::{self, Source};
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::{Millis, DAY};
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};

/// What the identity processor reads.
#[derive(Debug, Clone)]
pub enum IdentityInput {
    /// A raw site, app or offline event.
    Event(Box<IdentityEvent>),
    /// The profile processor forgot an anonymous profile after the retention
    /// (`forgotten` in `customer-actions`): its graph entries go too.
    Forgotten { profile: String, at: Millis },
    /// Another customer action: not the identity processor's.
    Ignored,
}

/// A decoded raw event with its identifiers normalized.
#[derive(Debug, Clone)]
pub struct IdentityEvent {
    source: Source,
    event: RawEvent,
    /// The event's customer id, if it names one.
    customer_id: Option<Identifier>,
    /// Its other identifiers, strongest first.
    identifiers: Vec<Identifier>,
    /// The record key as produced, and the partition it was read from: a heartbeat
    /// goes on to the profile's partition of that number (see `heartbeat_key`).
    key: Vec<u8>,
    partition: i32,
}

#[derive(Debug, Clone)]
enum RawEvent {
    Event(Box<CustomerEvent>),
    Receipt(Box<OfflineReceipt>),
}

impl RawEvent {
    fn occurred_at(&self) -> Millis {
        match self {
            RawEvent::Event(e) => e.occurred_at,
            RawEvent::Receipt(r) => r.occurred_at,
        }
    }

    fn event_id(&self) -> &str {
        match self {
            RawEvent::Event(e) => &e.event_id,
            RawEvent::Receipt(r) => &r.event_id,
        }
    }
}

/// An identifier's entry in the graph (`i/<kind>:<value>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Link {
    customer: String,
    /// Known customers that presented it (sorted), up to one past the limit.
    claimants: Vec<String>,
    /// Presented by too many customers: it no longer links or resolves.
    shared: bool,
}

/// A customer in the graph (`n/<customer id>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Node {
    /// Named by a customer id (else an anonymous visitor, a card or a phone alone).
    known: bool,
    first_seen: Millis,
    /// Set once this customer was merged into another.
    merged_into: Option<String>,
    /// Customers merged into this one (re-pointed if this one merges on).
    merged_from: Vec<String>,
    /// Identifiers linked to it.
    identifiers: Vec<String>,
    /// The latest event it was resolved to, to the day (0: none since it was created
    /// by a version that did not keep it); an anonymous profile expires from it.
    #[serde(default)]
    last_seen: Millis,
    /// It reached `identity.max_identifiers_per_customer` and that was logged once.
    #[serde(default)]
    at_identifier_limit: bool,
}

struct Metrics {
    resolved: IntCounterVec,
    at_limit: IntCounterVec,
    merges: IntCounterVec,
    shared: IntCounterVec,
    conflicts: IntCounterVec,
    expired: prometheus::IntCounter,
    dropped: IntCounterVec,
    /// Identifiers dropped since the start: every power of two of them is logged.
    dropped_so_far: std::sync::atomic::AtomicU64,
}

pub struct IdentityProcessor {
    registry: SchemaRegistry,
    /// Orders and receipts into `profile.currency`, before the profile reads them.
    currencies: input::Currencies,
    normalizer: Normalizer,
    merge_on: Vec<IdentifierKind>,
    max_claimants: usize,
    max_identifiers: usize,
    survivor_rule: SurvivorRule,
    /// 0: anonymous profiles are kept for good.
    anonymous_retention: Millis,
    site_topic: String,
    app_topic: String,
    offline_topic: String,
    identified_topic: String,
    changes_topic: String,
    /// Read for the profile processor's `forgotten` actions.
    actions_topic: String,
    /// A key that lands on each partition (by number), for heartbeats.
    heartbeat_keys: Vec<String>,
    metrics: Metrics,
}

/// The identifiers that are addresses a profile sends to (see
/// `another_persons_address`).
const ADDRESS_KINDS: [IdentifierKind; 2] = [IdentifierKind::email, IdentifierKind::phone];

/// Identifiers of a browser or an app install rather than of a person.
const DEVICE_KINDS: [IdentifierKind; 2] = [IdentifierKind::device_id, IdentifierKind::anonymous_id];

/// The kind of address (e-mail or phone) a profile's identifier `held` is, if one.
fn held_address_kind(held: &str) -> Option<IdentifierKind> {
    ADDRESS_KINDS.into_iter().find(|k| {
        held.strip_prefix(k.as_str())
            .is_some_and(|v| v.starts_with(':'))
    })
}

/// Whether a profile holds an e-mail address.
fn holds_email(node: &Node) -> bool {
    (node.identifiers.iter()).any(|i| held_address_kind(i) == Some(IdentifierKind::email))
}

/// Resolution outcomes (metric label).
const RESOLVED: [&str; 4] = ["customer_id", "linked", "new", "another_person"];

impl IdentityProcessor {
    pub fn new(
        config: Arc<Config>,
        registry: SchemaRegistry,
        prom: &prometheus::Registry,
    ) -> anyhow::Result<Self> {
        let identity = &config.identity;
        let normalizer = Normalizer::new(&identity.default_country)
            .map_err(|e| anyhow::anyhow!("identity.default_country: {e}"))?;
        let m = Metrics {
            resolved: metrics::counter_vec(
                prom,
                "kairos_identity_events_total",
                "Events resolved to a customer, by how: a customer id on the event, a linked identifier, a new profile, or the profile of an address someone else typed on a known customer's device (another_person).",
                &["resolution"],
            ),
            merges: metrics::counter_vec(
                prom,
                "kairos_identity_merges_total",
                "Profiles merged, by kind: an anonymous profile joining a customer (stitch) or two known customers (merge).",
                &["kind"],
            ),
            shared: metrics::counter_vec(
                prom,
                "kairos_identity_shared_identifiers_total",
                "Identifiers that stopped linking because too many customers presented them, by identifier kind.",
                &["kind"],
            ),
            at_limit: metrics::counter_vec(
                prom,
                "kairos_identity_identifier_limit_total",
                "Identifiers not linked, or anonymous profiles not merged, because the customer holds identity.max_identifiers_per_customer identifiers already, by identifier kind.",
                &["kind"],
            ),
            conflicts: metrics::counter_vec(
                prom,
                "kairos_identity_conflicts_total",
                "Identifiers presented by a second known customer without being trusted to merge, by identifier kind.",
                &["kind"],
            ),
            expired: metrics::counter(
                prom,
                "kairos_identity_anonymous_profiles_expired_total",
                "Anonymous profiles taken out of the graph as the profile processor forgot them (identity.anonymous_retention without an event or an opened or clicked message).",
            ),
            dropped: metrics::counter_vec(
                prom,
                "kairos_identity_invalid_identifiers_dropped_total",
                "Invalid e-mail addresses, phones and loyalty cards taken off an event that went on with its other identifiers, by identifier kind.",
                &["kind"],
            ),
            dropped_so_far: std::sync::atomic::AtomicU64::new(0),
        };
        for r in RESOLVED {
            m.resolved.with_label_values(&[r]);
        }
        for k in ["stitch", "merge"] {
            m.merges.with_label_values(&[k]);
        }
        for k in IdentifierKind::ALL {
            m.shared.with_label_values(&[k.as_str()]);
            m.conflicts.with_label_values(&[k.as_str()]);
            m.at_limit.with_label_values(&[k.as_str()]);
            m.dropped.with_label_values(&[k.as_str()]);
        }
        Ok(IdentityProcessor {
            registry,
            currencies: input::Currencies::new(&config.profile),
            normalizer,
            merge_on: identity.merge_on.clone(),
            max_claimants: identity.max_customers_per_identifier,
            max_identifiers: identity.max_identifiers_per_customer,
            survivor_rule: identity.survivor,
            anonymous_retention: Millis::try_from(identity.anonymous_retention.as_millis())
                .unwrap_or(Millis::MAX),
            site_topic: config.topic(topics::SITE_EVENTS),
            app_topic: config.topic(topics::APP_EVENTS),
            offline_topic: config.topic(topics::OFFLINE_EVENTS),
            identified_topic: config.topic(topics::IDENTIFIED_EVENTS),
            changes_topic: config.topic(topics::IDENTITY_CHANGES),
            actions_topic: config.topic(topics::CUSTOMER_ACTIONS),
            heartbeat_keys: heartbeat_keys(config.kafka.partitions),
            metrics: m,
        })
    }

    /// Normalizes an identifier field in place (the event goes on with the normal
    /// form) and returns it; an empty field is no identifier.
    fn normalize_field(
        &self,
        kind: IdentifierKind,
        field: &mut Option<String>,
    ) -> Result<Option<Identifier>, InvalidIdentifier> {
        let Some(raw) = field.as_deref().filter(|r| !r.trim().is_empty()) else {
            return Ok(None);
        };
        let id = self.normalizer.normalize(kind, raw)?;
        *field = Some(id.value.clone());
        Ok(Some(id))
    }

    /// [`Self::normalize_field`] for an id that keys state: an invalid one rejects the
    /// event.
    fn normalize(
        &self,
        kind: IdentifierKind,
        field: &mut Option<String>,
    ) -> Result<Option<Identifier>, Rejection> {
        self.normalize_field(kind, field)
            .map_err(|e| Rejection::new(DeadLetterReason::invalid_field, e.to_string()))
    }

    /// [`Self::normalize_field`] for an identifier that only links (a contact, a card):
    /// an invalid one is taken off the event, which goes on without it (a receipt
    /// whose till phone was mistyped still counts), and is kept in `dropped`.
    fn normalize_link(
        &self,
        kind: IdentifierKind,
        field: &mut Option<String>,
        dropped: &mut Vec<InvalidIdentifier>,
    ) -> Option<Identifier> {
        self.normalize_field(kind, field).unwrap_or_else(|invalid| {
            *field = None;
            dropped.push(invalid);
            None
        })
    }

    /// Counts and logs (the 1st, 2nd, 4th, 8th... of them) identifiers taken off an
    /// event that went on. The value is not logged: it stays in the source record.
    fn report_dropped(&self, record: &Record<'_>, event_id: &str, dropped: &[InvalidIdentifier]) {
        use std::sync::atomic::Ordering;
        for invalid in dropped {
            let kind = invalid.kind;
            self.metrics.dropped.with_label_values(&[kind]).inc();
            let n = self.metrics.dropped_so_far.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped_so_far = n,
                    topic = record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    event_id,
                    kind,
                    why = %invalid.reason,
                    "an invalid identifier was taken off an event, which went on without it"
                );
            }
        }
    }

    /// Counts an identifier that `customer` (holding `node`) does not take, being at
    /// `identity.max_identifiers_per_customer`, and logs the first such one.
    fn refuse_past_limit(
        &self,
        ctx: &mut Ctx<'_>,
        customer: &str,
        mut node: Node,
        id: &Identifier,
    ) -> anyhow::Result<()> {
        self.metrics
            .at_limit
            .with_label_values(&[id.kind.as_str()])
            .inc();
        if !node.at_identifier_limit {
            tracing::warn!(
                customer,
                identifiers = node.identifiers.len(),
                "customer holds identity.max_identifiers_per_customer identifiers: no more are linked (a placeholder customer id?)"
            );
            node.at_identifier_limit = true;
            ctx.put(&node_key(customer), &node)?;
        }
        Ok(())
    }

    /// Whether `owner` (a canonical customer) is one of the people who presented the
    /// identifier of `link`.
    fn claimed_by(&self, ctx: &mut Ctx<'_>, link: &Link, owner: &str) -> anyhow::Result<bool> {
        for held in &link.claimants {
            if self.canonical(ctx, held)? == owner {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Moves identifier `id` (its `link`) from `owner`'s profile to `target`'s, unless
    /// `target` is at `identity.max_identifiers_per_customer`; returns whether it moved.
    fn move_link(
        &self,
        ctx: &mut Ctx<'_>,
        id: &Identifier,
        mut link: Link,
        owner: &str,
        target: &str,
    ) -> anyhow::Result<bool> {
        let mut target_node = self.node(ctx, target)?;
        if target_node.identifiers.len() >= self.max_identifiers {
            self.refuse_past_limit(ctx, target, target_node, id)?;
            return Ok(false);
        }
        let name = id.to_string();
        let mut owner_node = self.node(ctx, owner)?;
        owner_node.identifiers.retain(|i| *i != name);
        ctx.put(&node_key(owner), &owner_node)?;
        target_node.identifiers.push(name);
        ctx.put(&node_key(target), &target_node)?;
        link.customer = target.to_string();
        ctx.put(&link_key(id), &link)?;
        Ok(true)
    }

    /// Counts and reports a `conflict` over `id` between its `owner` and `target`;
    /// `what` tells the change ids of a link moved and one left apart.
    fn report_conflict(
        &self,
        ctx: &mut Ctx<'_>,
        what: &str,
        id: &Identifier,
        owner: String,
        target: &str,
        at: Millis,
    ) {
        self.metrics
            .conflicts
            .with_label_values(&[id.kind.as_str()])
            .inc();
        self.report(
            ctx,
            deterministic_id(&[what, &id.to_string(), target]),
            IdentityChangeKind::conflict,
            target,
            None,
            id,
            vec![owner, target.to_string()],
            at,
        );
    }

    /// Reports a merge, a shared identifier or a conflict on `identity-changes`.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        ctx: &mut Ctx<'_>,
        change_id: String,
        kind: IdentityChangeKind,
        customer: &str,
        merged_from: Option<String>,
        identifier: &Identifier,
        customers: Vec<String>,
        at: Millis,
    ) {
        let change = IdentityChange {
            change_id,
            kind,
            customer_id: customer.to_string(),
            merged_from,
            identifier: identifier.to_string(),
            customers,
            occurred_at: at,
        };
        ctx.emit(&self.changes_topic, customer, &change);
    }

    /// The current customer of `customer` (following merges).
    fn canonical(&self, ctx: &Ctx<'_>, customer: &str) -> anyhow::Result<String> {
        let mut current = customer.to_string();
        // Merges re-point their sources, so chains stay short; the bound only guards
        // against a corrupt cycle.
        for _ in 0..32 {
            match ctx.get::<Node>(&node_key(&current))? {
                Some(Node {
                    merged_into: Some(next),
                    ..
                }) => current = next,
                _ => return Ok(current),
            }
        }
        anyhow::bail!("merge chain of {customer} does not end")
    }

    fn node(&self, ctx: &Ctx<'_>, customer: &str) -> anyhow::Result<Node> {
        Ok(ctx.get::<Node>(&node_key(customer))?.unwrap_or_default())
    }

    /// The survivor and the merged one of two customers.
    fn survivor(&self, a: (&str, &Node), b: (&str, &Node)) -> (String, String) {
        let a_first = match (a.1.known, b.1.known) {
            (true, false) => true,
            (false, true) => false,
            _ => match self.survivor_rule {
                SurvivorRule::SmallestId => a.0 < b.0,
                SurvivorRule::FirstSeen => (a.1.first_seen, a.0) < (b.1.first_seen, b.0),
            },
        };
        if a_first {
            (a.0.to_string(), b.0.to_string())
        } else {
            (b.0.to_string(), a.0.to_string())
        }
    }

    /// Merges two customers; returns the survivor.
    fn merge(
        &self,
        ctx: &mut Ctx<'_>,
        a: &str,
        b: &str,
        proof: &Identifier,
        at: Millis,
    ) -> anyhow::Result<String> {
        let (na, nb) = (self.node(ctx, a)?, self.node(ctx, b)?);
        let (survivor, merged) = self.survivor((a, &na), (b, &nb));
        let (mut s, mut m) = if survivor == a { (na, nb) } else { (nb, na) };
        let kind = if s.known && m.known {
            "merge"
        } else {
            "stitch"
        };
        for id in &m.identifiers {
            if let Some(mut link) = ctx.get::<Link>(&link_key_str(id))? {
                link.customer = survivor.clone();
                ctx.put(&link_key_str(id), &link)?;
            }
        }
        for from in &m.merged_from {
            let mut n = self.node(ctx, from)?;
            n.merged_into = Some(survivor.clone());
            ctx.put(&node_key(from), &n)?;
        }
        s.known |= m.known;
        s.first_seen = s.first_seen.min(m.first_seen);
        s.identifiers.append(&mut m.identifiers);
        s.merged_from.append(&mut m.merged_from);
        s.merged_from.push(merged.clone());
        m.merged_into = Some(survivor.clone());
        ctx.put(&node_key(&survivor), &s)?;
        ctx.put(&node_key(&merged), &m)?;
        let merge = CustomerMerge {
            merge_id: deterministic_id(&["merge", &merged, &survivor]),
            from: merged.clone(),
            into: survivor.clone(),
            identifier: proof.to_string(),
            occurred_at: at,
        };
        // Keyed by the survivor, ahead of the event that caused the merge: its
        // triggers wait for the merged profile (which may carry an unsubscribe).
        ctx.emit(
            &self.identified_topic,
            &survivor,
            &IdentifiedRecord::merge_expected(merge.clone()),
        );
        // Keyed by the merged customer: it comes after that customer's earlier events.
        ctx.emit(
            &self.identified_topic,
            &merged,
            &IdentifiedRecord::merge(merge.clone()),
        );
        self.report(
            ctx,
            merge.merge_id.clone(),
            IdentityChangeKind::merged,
            &survivor,
            Some(merged.clone()),
            proof,
            vec![survivor.clone(), merged.clone()],
            at,
        );
        self.metrics.merges.with_label_values(&[kind]).inc();
        tracing::debug!(%merged, %survivor, identifier = %proof, "customers merged");
        Ok(survivor)
    }

    /// Resolves an event's identifiers to one customer, linking and merging on the way.
    fn resolve(&self, ctx: &mut Ctx<'_>, input: &IdentityEvent) -> anyhow::Result<String> {
        let at = input.event.occurred_at();
        let mut resolution = "linked";
        let mut target = match &input.customer_id {
            Some(c) => {
                resolution = "customer_id";
                begin_node(ctx, &c.value, true, at)?;
                Some(self.canonical(ctx, &c.value)?)
            }
            None => None,
        };
        let mut links = Vec::with_capacity(input.identifiers.len());
        for id in &input.identifiers {
            links.push((id, stored_link(ctx, id)?));
        }
        // The event names its person: by login, or by a trusted identifier of a
        // known customer. Through an untrusted one (a family laptop's cookie, a
        // family phone) it may be anyone of a household.
        let mut named = target.is_some();
        if target.is_none() {
            // Without a login, the event is the known customer's its trusted
            // identifiers (`merge_on`) name, before one an untrusted identifier names:
            // a family phone must not pick the husband when the wife's loyalty card
            // is on the form too, or the card would then merge the two of them.
            // A trusted identifier names its owner as the person at the keyboard only
            // if the owner presented it: one that came to them with a stitched profile
            // or through an untrusted identifier (the wife's e-mail typed on the
            // husband's laptop) still leads to them, before an untrusted one, but
            // proves nothing of who is there, however often it comes again.
            let mut owners = Vec::new();
            for (id, link) in &links {
                if let Some(l) = link.as_ref().filter(|l| !l.shared) {
                    let owner = self.canonical(ctx, &l.customer)?;
                    let known = self.node(ctx, &owner)?.known;
                    let trusted = self.merge_on.contains(&id.kind);
                    let claimed = trusted && self.claimed_by(ctx, l, &owner)?;
                    owners.push((owner, known, trusted, claimed));
                }
            }
            let by_claimed = owners
                .iter()
                .find(|(_, known, _, claimed)| *known && *claimed);
            named = by_claimed.is_some();
            target = by_claimed
                .or_else(|| {
                    owners
                        .iter()
                        .find(|(_, known, trusted, _)| *known && *trusted)
                })
                .or_else(|| owners.iter().find(|(_, known, _, _)| *known))
                .or(owners.first())
                .map(|(o, _, _, _)| o.clone());
        }
        // The profile a device led to (a known customer's, or an anonymous one), passed
        // over for someone else's address.
        let mut passed_over = None;
        // Whether a device or cookie of the event is that profile's: then the event's
        // new ones are the same device's (see the linking below).
        let mut device_passed_over = false;
        if let Some(led_to) = target.clone().filter(|_| !named) {
            if let Some(other) = self.another_persons_address(ctx, &links, &led_to)? {
                resolution = "another_person";
                for (id, link) in &links {
                    if let Some(l) = link.as_ref().filter(|l| !l.shared) {
                        if DEVICE_KINDS.contains(&id.kind)
                            && self.canonical(ctx, &l.customer)? == led_to
                        {
                            device_passed_over = true;
                            break;
                        }
                    }
                }
                passed_over = Some(led_to);
                target = Some(other);
            }
        }
        let mut target = match target {
            Some(t) => t,
            None => {
                // Nobody we know: a new profile named after its strongest identifier
                // that is not shared. Named after a shared one, the profile would
                // take the event's other identifiers, and whoever presented one of
                // them later would absorb it with every receipt of the shared card.
                resolution = "new";
                let unshared = links
                    .iter()
                    .filter(|(_, link)| !link.as_ref().is_some_and(|l| l.shared))
                    .map(|(id, _)| *id)
                    .min_by_key(|i| anonymous_rank(i.kind));
                let name = unshared
                    .or_else(|| {
                        input
                            .identifiers
                            .iter()
                            .min_by_key(|i| anonymous_rank(i.kind))
                    })
                    .ok_or_else(|| anyhow::anyhow!("event without identifiers"))?;
                self.new_profile(ctx, name)?
            }
        };
        self.metrics.resolved.with_label_values(&[resolution]).inc();
        // Before any merge it causes: a late event older than its customer's first
        // moves it back, so the `first_seen` survivor rule counts the event itself.
        self.seen(ctx, &target, at)?;
        // Who presents the identifiers: the event's customer, else the known customer
        // its trusted identifiers resolved to (an e-mail and a card on a form without
        // a login still make that customer one more holder of the card). Nobody when
        // only an untrusted one led to them: the wife typing her e-mail on the
        // husband's laptop does not make him its holder, or her registering with it
        // would merge the two of them.
        // The person, not the id they logged in with: a customer merged into another
        // is that other one (`target`, here, and again after each merge below), and
        // counting both would make two holders of one.
        let mut claimant = named.then(|| target.clone());
        for id in &input.identifiers {
            // Read again: a merge earlier in this loop may have re-pointed it.
            let Some(mut link) = ctx.get::<Link>(&link_key(id))? else {
                // A new cookie or device id of an event passed over from the known
                // customer of the event's device names that device, not the person
                // typing: it stays with him. Linked to her profile, the next event of
                // the device without her address (an app open) would join her profile
                // to his. Passed over for another reason (her phone, typed on his
                // laptop once, on her own device), the new one is hers.
                let holder = match &passed_over {
                    Some(known) if device_passed_over && DEVICE_KINDS.contains(&id.kind) => {
                        known.clone()
                    }
                    _ => target.clone(),
                };
                let mut node = self.node(ctx, &holder)?;
                if node.identifiers.len() >= self.max_identifiers {
                    self.refuse_past_limit(ctx, &holder, node, id)?;
                    continue;
                }
                node.identifiers.push(id.to_string());
                ctx.put(&node_key(&holder), &node)?;
                let link = Link {
                    customer: holder,
                    claimants: claimant.iter().cloned().collect(),
                    shared: false,
                };
                ctx.put(&link_key(id), &link)?;
                continue;
            };
            if link.shared {
                continue;
            }
            let mut new_claimant = claimant
                .as_ref()
                .filter(|c| !link.claimants.contains(c))
                .cloned();
            if let Some(c) = new_claimant.clone() {
                // A holder noted before a merge (through another identifier) may be
                // this one now: then nobody new presents it. An untrusted identifier's
                // holders are kept as the people they are now; a trusted identifier's
                // as noted, each customer it merged counting, or a shop's test card
                // would merge every customer it is scanned for.
                let mut people = Vec::with_capacity(link.claimants.len());
                for held in &link.claimants {
                    people.push(self.canonical(ctx, held)?);
                }
                if people.contains(&c) {
                    new_claimant = None;
                }
                if !self.merge_on.contains(&id.kind) {
                    link.claimants = people;
                }
                link.claimants.extend(new_claimant.iter().cloned());
                link.claimants.sort();
                link.claimants.dedup();
                if link.claimants.len() > self.max_claimants {
                    // Too many people present it: it stops linking anyone.
                    link.shared = true;
                    ctx.put(&link_key(id), &link)?;
                    self.metrics
                        .shared
                        .with_label_values(&[id.kind.as_str()])
                        .inc();
                    tracing::warn!(identifier = %id, customers = link.claimants.len(), "shared identifier stops linking");
                    self.report(
                        ctx,
                        deterministic_id(&["shared", &id.to_string()]),
                        IdentityChangeKind::identifier_shared,
                        &target,
                        None,
                        id,
                        link.claimants.clone(),
                        at,
                    );
                    continue;
                }
                ctx.put(&link_key(id), &link)?;
            }
            let owner = self.canonical(ctx, &link.customer)?;
            // The device of the known customer passed over stays theirs.
            if owner == target || passed_over.as_ref() == Some(&owner) {
                continue;
            }
            // A profile begun again from a link that outlived it (see `seen`).
            begin_node(ctx, &owner, false, at)?;
            let (owner_node, target_node) = (self.node(ctx, &owner)?, self.node(ctx, &target)?);
            let both_known = owner_node.known && target_node.known;
            let held = owner_node.identifiers.len() + target_node.identifiers.len();
            if held > self.max_identifiers && (!both_known || self.merge_on.contains(&id.kind)) {
                // The event stays the target's; the other profile stays apart. The one
                // holding more identifiers is the one at the limit.
                let target_holds_more =
                    target_node.identifiers.len() >= owner_node.identifiers.len();
                let (customer, node) = match target_holds_more {
                    true => (&target, target_node),
                    false => (&owner, owner_node),
                };
                self.refuse_past_limit(ctx, customer, node, id)?;
            } else if both_known
                && (self.merge_on.contains(&id.kind) || ADDRESS_KINDS.contains(&id.kind))
                && !self.claimed_by(ctx, &link, &owner)?
            {
                // Its owner never presented it: it came to them with an anonymous
                // profile or through an untrusted identifier. The one presenting it
                // takes it; nobody is merged. Without a presenter (an event that names
                // nobody) it stays. So does an e-mail or phone not trusted to merge
                // (the wife's phone typed on the husband's laptop): it is hers once she
                // presents it, or his messages would go to her number on her consent
                // and her purchases made with it to his profile.
                if claimant.is_some() && self.move_link(ctx, id, link, &owner, &target)? {
                    // Its former owner's profile may hold it as an address (the wife's
                    // e-mail as the husband's): told after that profile's earlier events.
                    let moved = IdentifierMoved {
                        move_id: deterministic_id(&["identifier_moved", &id.to_string(), &target]),
                        from: owner.clone(),
                        to: target.clone(),
                        identifier: id.to_string(),
                        occurred_at: at,
                    };
                    ctx.emit(
                        &self.identified_topic,
                        &owner,
                        &IdentifiedRecord::identifier_moved(moved),
                    );
                    self.report_conflict(ctx, "moved", id, owner, &target, at);
                }
            } else if DEVICE_KINDS.contains(&id.kind)
                && !owner_node.known
                && !target_node.known
                && holds_email(&owner_node)
                && holds_email(&target_node)
            {
                // Two anonymous profiles that each gave an e-mail, met on one device:
                // two people at a kiosk or a family tablet (one of them back with an
                // address linked already), not one person's two visits. The device
                // stays with its profile; merged, the first to register would take in
                // the other's address and consent.
                continue;
            } else if !both_known || self.merge_on.contains(&id.kind) {
                target = self.merge(ctx, &owner, &target, id, at)?;
                if claimant.is_some() {
                    claimant = Some(target.clone());
                }
            } else if new_claimant.is_some() {
                // Known to belong to someone else and not trusted to merge: it stays.
                self.report_conflict(ctx, "conflict", id, owner, &target, at);
            }
        }
        self.seen(ctx, &target, at)?;
        Ok(target)
    }

    /// The profile of the event's `identifier`, named after it: a new one, unless its
    /// anonymous profile was stitched to a customer since and the identifier then
    /// found shared (else it would have linked): following that profile would hand the
    /// event to one of the people who share it, so it goes to a profile of the shared
    /// identifier.
    fn new_profile(&self, ctx: &mut Ctx<'_>, identifier: &Identifier) -> anyhow::Result<String> {
        let name = anonymous_name(identifier);
        let name = match ctx.get::<Node>(&node_key(&name))? {
            Some(node) if node.merged_into.is_some() => {
                format!("{name}{SHARED_IDENTIFIER_SUFFIX}")
            }
            _ => name,
        };
        self.canonical(ctx, &name)
    }

    /// An e-mail or phone of the event nobody known holds, when the profile a device
    /// led the event to (`led_to`) holds another one of that kind: a known customer
    /// one they presented themselves, an anonymous profile another e-mail, and none of
    /// the event's own addresses. Someone else is at the keyboard (the wife typing her
    /// e-mail on the husband's laptop, where he registered with his; a visitor at a
    /// kiosk where another signed up before). Returns the profile the event
    /// goes to instead: the anonymous one the address leads to, or a new one named
    /// after it. Without this the address (and a consent given with it) would become
    /// the husband's until she registers with it. An address of a kind he presented
    /// none of, or an address he presented himself on the event (his phone with a work
    /// e-mail), may be him: the event stays his; so it does when an identifier of it
    /// leads to another known customer (the rules for two customers apply).
    fn another_persons_address(
        &self,
        ctx: &mut Ctx<'_>,
        links: &[(&Identifier, Option<Link>)],
        led_to: &str,
    ) -> anyhow::Result<Option<String>> {
        let is_address = |kind: IdentifierKind| ADDRESS_KINDS.contains(&kind);
        if !links.iter().any(|(id, _)| is_address(id.kind)) {
            return Ok(None);
        }
        // Addresses nobody known holds, with the anonymous profile each leads to.
        let mut unheld = Vec::new();
        for (id, link) in links {
            let (owner, link) = match link {
                Some(l) if l.shared => continue,
                Some(l) => (Some(self.canonical(ctx, &l.customer)?), Some(l)),
                None => (None, None),
            };
            match &owner {
                // One of the addresses he presented himself on it (his phone, with a
                // work e-mail at a guest checkout): it may be him. One that only came
                // to him (the wife's e-mail, typed on the laptop before he registered
                // there) says nothing of who is typing.
                Some(owner) if owner == led_to => {
                    if let Some(l) = link.filter(|_| is_address(id.kind)) {
                        // An anonymous profile presented nothing: any address of its
                        // own on the event is as good (a guest checkout with the
                        // e-mail it holds and a new phone).
                        if self.claimed_by(ctx, l, led_to)? || !self.node(ctx, led_to)?.known {
                            return Ok(None);
                        }
                    }
                }
                // Another known customer it leads to (a family phone): the rules for
                // two customers apply, not this one.
                Some(owner) if self.node(ctx, owner)?.known => return Ok(None),
                _ => {
                    if is_address(id.kind) {
                        unheld.push((*id, owner));
                    }
                }
            }
        }
        if unheld.is_empty() {
            return Ok(None);
        }
        // The kinds of address the known customer presented himself. An anonymous
        // profile presented nothing (only a login names someone), but an e-mail it
        // holds is the first person's to give one on its device: another one is
        // someone else's (a kiosk's sign-up form, a tablet in the family), or every
        // visitor's address and consent would pile up in it, for the first of them to
        // take in by logging in. (Not a phone: one person's landline and mobile.)
        let node = self.node(ctx, led_to)?;
        let mut presented = Vec::new();
        if !node.known {
            if holds_email(&node) {
                presented.push(IdentifierKind::email);
            }
        } else {
            for held in &node.identifiers {
                let Some(kind) = held_address_kind(held) else {
                    continue;
                };
                if presented.contains(&kind) || !unheld.iter().any(|(id, _)| id.kind == kind) {
                    continue;
                }
                if let Some(l) = ctx.get::<Link>(&link_key_str(held))? {
                    if self.claimed_by(ctx, &l, led_to)? {
                        presented.push(kind);
                    }
                }
            }
        }
        let Some((id, owner)) = unheld
            .into_iter()
            .find(|(id, _)| presented.contains(&id.kind))
        else {
            return Ok(None);
        };
        Ok(Some(match owner {
            Some(owner) => owner,
            None => self.new_profile(ctx, id)?,
        }))
    }

    /// Notes an event of a profile: an event older than every one before it (events
    /// come late and out of order) moves `first_seen` back, so the `first_seen`
    /// survivor rule compares when the customers were first seen, not which event
    /// arrived first. An anonymous profile's last event is kept to the day (one write
    /// of the node per visitor and day): its forgetting leaves the node alone if it
    /// came since (see `expire_anonymous`).
    fn seen(&self, ctx: &mut Ctx<'_>, profile: &str, at: Millis) -> anyhow::Result<()> {
        let key = node_key(profile);
        // None yet: a new anonymous profile, or one begun again from a link that
        // outlived it (a claimed link stays when its profile is forgotten), first seen
        // now, not at time 0 (which would win every `first_seen` survivor contest).
        let (mut node, new) = match ctx.get::<Node>(&key)? {
            Some(node) => (node, false),
            None => (
                Node {
                    first_seen: at,
                    ..Node::default()
                },
                true,
            ),
        };
        let earlier = at < node.first_seen;
        node.first_seen = node.first_seen.min(at);
        let next_day = self.anonymous_retention != 0
            && !node.known
            && node.merged_into.is_none()
            && at >= node.last_seen.saturating_add(DAY);
        if next_day {
            node.last_seen = at;
        }
        if new || earlier || next_day {
            ctx.put(&key, &node)?;
        }
        Ok(())
    }

    /// Forgets an anonymous profile the profile processor forgot at `now`, after
    /// `anonymous_retention` without an event or an opened or clicked message (the
    /// profile processor is the one that knows both): its node and the links that only
    /// it holds (a shared or claimed identifier keeps its link, so what it learnt
    /// stays). One that became known, was stitched or merged into, or had an event
    /// within the retention before `now` (the visitor came back as it was forgotten),
    /// stays.
    fn expire_anonymous(
        &self,
        ctx: &mut Ctx<'_>,
        profile: &str,
        now: Millis,
    ) -> anyhow::Result<()> {
        let key = node_key(profile);
        let Some(node) = ctx.get::<Node>(&key)? else {
            return Ok(());
        };
        if node.known
            || node.merged_into.is_some()
            || !node.merged_from.is_empty()
            || now < node.last_seen.saturating_add(self.anonymous_retention)
        {
            return Ok(());
        }
        for id in &node.identifiers {
            let link_key = link_key_str(id);
            if ctx
                .get::<Link>(&link_key)?
                .is_some_and(|l| l.customer == profile && !l.shared && l.claimants.is_empty())
            {
                ctx.delete(&link_key);
            }
        }
        ctx.delete(&key);
        self.metrics.expired.inc();
        tracing::debug!(%profile, "anonymous profile expired");
        Ok(())
    }

    /// The key of a heartbeat read on `partition` as it goes on: its own if that
    /// leads back to the partition, else one that does. A producer beating every
    /// partition in turn sends no key (or any), and keyed by "" the heartbeats of every
    /// partition would reach one profile partition (librdkafka puts an empty key on a
    /// random one).
    fn heartbeat_key(&self, produced: &[u8], partition: i32) -> String {
        let partitions = self.heartbeat_keys.len() as i32;
        // A key that is not UTF-8 would go on as other bytes, to another partition.
        let own = std::str::from_utf8(produced).ok().filter(|_| {
            !produced.is_empty()
                && kairos_core::replay::partition_for(produced, partitions) == partition
        });
        match (own, self.heartbeat_keys.get(partition as usize)) {
            (Some(own), _) => own.to_string(),
            (None, Some(key)) => key.clone(),
            (None, None) => String::from_utf8_lossy(produced).into_owned(),
        }
    }

    /// The event as the profile sees it: identifiers normalized (in `decode`), the
    /// resolved customer.
    fn identified(&self, input: IdentityEvent, customer: &str) -> IdentifiedRecord {
        match input.event {
            RawEvent::Event(mut e) => {
                e.customer_id = Some(customer.to_string());
                match input.source {
                    Source::App => IdentifiedRecord::app(e),
                    _ => IdentifiedRecord::site(e),
                }
            }
            RawEvent::Receipt(mut r) => {
                r.customer_id = Some(customer.to_string());
                IdentifiedRecord::offline(r)
            }
        }
    }
}

/// For each partition, a key the partitioner puts on it (`~heartbeat/<n>`, the first
/// that does; a few tries per partition).
fn heartbeat_keys(partitions: i32) -> Vec<String> {
    let partitions = partitions.max(1);
    let mut keys = vec![String::new(); partitions as usize];
    let mut missing = keys.len();
    for n in 0u64.. {
        let key = format!("~heartbeat/{n}");
        let p = kairos_core::replay::partition_for(key.as_bytes(), partitions) as usize;
        if keys[p].is_empty() {
            keys[p] = key;
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    keys
}

/// Stores a node for `customer` first seen at `at`, unless it has one.
fn begin_node(ctx: &mut Ctx<'_>, customer: &str, known: bool, at: Millis) -> anyhow::Result<()> {
    let key = node_key(customer);
    if ctx.get::<Node>(&key)?.is_none() {
        let node = Node {
            known,
            first_seen: at,
            ..Node::default()
        };
        ctx.put(&key, &node)?;
    }
    Ok(())
}

/// Which identifier names a profile nobody is known for: the session cookie first.
fn anonymous_rank(kind: IdentifierKind) -> u8 {
    match kind {
        IdentifierKind::anonymous_id => 0,
        IdentifierKind::device_id => 1,
        IdentifierKind::loyalty_card => 2,
        IdentifierKind::phone => 3,
        IdentifierKind::email => 4,
        IdentifierKind::customer_id => 5,
    }
}

/// The customer id of a profile known only by `id` (the names the profile processor
/// uses without identity resolution: `anon:…`, `device:…`, `card:…`).
fn anonymous_name(id: &Identifier) -> String {
    let prefix = match id.kind {
        IdentifierKind::anonymous_id => "anon",
        IdentifierKind::device_id => "device",
        IdentifierKind::loyalty_card => "card",
        IdentifierKind::phone => "phone",
        IdentifierKind::email => "email",
        IdentifierKind::customer_id => "customer",
    };
    format!("{prefix}:{}", id.value)
}

fn node_key(customer: &str) -> String {
    format!("n/{customer}")
}

/// The link of `id`. An e-mail with a Unicode domain was stored under that spelling
/// before e-mails were normalized to the ASCII (IDNA) form: such a link is found there
/// and copied to the new key, so the customer it names is not split in two.
fn stored_link(ctx: &mut Ctx<'_>, id: &Identifier) -> anyhow::Result<Option<Link>> {
    let key = link_key(id);
    if let Some(link) = ctx.get::<Link>(&key)? {
        return Ok(Some(link));
    }
    if id.kind != IdentifierKind::email || !id.value.contains("xn--") {
        return Ok(None);
    }
    let Some((local, domain)) = id.value.rsplit_once('@') else {
        return Ok(None);
    };
    let (unicode, valid) = idna::domain_to_unicode(domain);
    if valid.is_err() || unicode == domain {
        return Ok(None);
    }
    let legacy = Identifier {
        kind: id.kind,
        value: format!("{local}@{unicode}"),
    };
    let legacy_key = link_key(&legacy);
    let found = ctx.get::<Link>(&legacy_key)?;
    if let Some(link) = &found {
        // Moved, not copied: the owner's node lists the new spelling, so expiring or
        // merging it reaches this key, and the old one is gone.
        ctx.put(&key, link)?;
        ctx.delete(&legacy_key);
        let owner = node_key(&link.customer);
        if let Some(mut node) = ctx.get::<Node>(&owner)? {
            let (old_name, new_name) = (legacy.to_string(), id.to_string());
            node.identifiers.retain(|i| *i != old_name);
            if !node.identifiers.contains(&new_name) {
                node.identifiers.push(new_name);
            }
            ctx.put(&owner, &node)?;
        }
    }
    Ok(found)
}

fn link_key(id: &Identifier) -> String {
    link_key_str(&id.to_string())
}

fn link_key_str(id: &str) -> String {
    format!("i/{id}")
}

impl Processor for IdentityProcessor {
    type Input = IdentityInput;

    fn name(&self) -> &str {
        "identity"
    }

    fn inputs(&self) -> Vec<String> {
        vec![
            self.site_topic.clone(),
            self.app_topic.clone(),
            self.offline_topic.clone(),
            self.actions_topic.clone(),
        ]
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.identified_topic.clone(), self.changes_topic.clone()]
    }

    fn is_raw_input(&self, topic: &str) -> bool {
        topic == self.site_topic || topic == self.app_topic || topic == self.offline_topic
    }

    fn single_state_partition(&self) -> bool {
        true
    }

    fn decode(&self, record: &Record<'_>) -> Result<IdentityInput, Rejection> {
        if record.topic == self.actions_topic {
            // Only the kind and the customer are read: the other actions (merged
            // ledgers among them) are the arbiter's, and a kind this version does not
            // know is none of its business either. Nor is one it cannot read: the
            // arbiter dead-letters it, once.
            #[derive(Deserialize)]
            struct ActionHead {
                kind: String,
                customer_id: String,
                occurred_at: Millis,
            }
            return Ok(match decode_internal::<ActionHead>(record.payload) {
                Ok(head) if head.kind == "forgotten" => IdentityInput::Forgotten {
                    profile: head.customer_id,
                    at: head.occurred_at,
                },
                _ => IdentityInput::Ignored,
            });
        }
        let mut found = Vec::new();
        // Ids that key state reject the event when invalid; the others are dropped.
        let mut dropped = Vec::new();
        let (source, customer_id, event) = if record.topic == self.offline_topic {
            let mut r = input::decode_receipt(record.payload, &self.registry, &self.currencies)?;
            let d = &mut dropped;
            found.push(self.normalize_link(IdentifierKind::loyalty_card, &mut r.loyalty_card, d));
            found.push(self.normalize_link(IdentifierKind::phone, &mut r.phone, d));
            let customer_id = self.normalize(IdentifierKind::customer_id, &mut r.customer_id)?;
            (Source::Offline, customer_id, RawEvent::Receipt(Box::new(r)))
        } else {
            let mut e =
                input::decode_identifiable_event(record.payload, &self.registry, &self.currencies)?;
            let customer_id = self.normalize(IdentifierKind::customer_id, &mut e.customer_id)?;
            let d = &mut dropped;
            found.push(self.normalize_link(IdentifierKind::email, &mut e.email, d));
            found.push(self.normalize_link(IdentifierKind::phone, &mut e.phone, d));
            if let Some(p) = e.profile.as_mut() {
                found.push(self.normalize_link(IdentifierKind::email, &mut p.email, d));
                found.push(self.normalize_link(IdentifierKind::phone, &mut p.phone, d));
            }
            found.push(self.normalize_link(IdentifierKind::loyalty_card, &mut e.loyalty_card, d));
            found.push(self.normalize(IdentifierKind::device_id, &mut e.device_id)?);
            found.push(self.normalize(IdentifierKind::anonymous_id, &mut e.anonymous_id)?);
            let source = if record.topic == self.app_topic {
                Source::App
            } else {
                Source::Site
            };
            (source, customer_id, RawEvent::Event(Box::new(e)))
        };
        let mut ids: Vec<Identifier> = Vec::with_capacity(found.len());
        for id in found.into_iter().flatten() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let heartbeat =
            matches!(&event, RawEvent::Event(e) if e.event_type == EventType::heartbeat);
        if customer_id.is_none() && ids.is_empty() && !heartbeat {
            if let Some(invalid) = dropped.first() {
                // Its only identifier was invalid: the event names nobody.
                return Err(Rejection::new(
                    DeadLetterReason::invalid_field,
                    invalid.to_string(),
                ));
            }
            return Err(Rejection::new(
                DeadLetterReason::missing_field,
                "no identifier: customer_id, anonymous_id, device_id, email, phone or loyalty_card",
            ));
        }
        if !dropped.is_empty() {
            self.report_dropped(record, event.event_id(), &dropped);
        }
        Ok(IdentityInput::Event(Box::new(IdentityEvent {
            source,
            event,
            customer_id,
            identifiers: ids,
            key: record.key.unwrap_or_default().to_vec(),
            partition: record.partition,
        })))
    }

    fn event_time(&self, input: &IdentityInput) -> Option<Millis> {
        match input {
            IdentityInput::Event(e) => Some(e.event.occurred_at()),
            // The profile's clock, not the producers': the graph's time stays theirs.
            IdentityInput::Forgotten { .. } | IdentityInput::Ignored => None,
        }
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: IdentityInput) -> anyhow::Result<()> {
        let input = match input {
            IdentityInput::Event(e) => *e,
            IdentityInput::Forgotten { profile, at } => {
                return self.expire_anonymous(ctx, &profile, at)
            }
            IdentityInput::Ignored => return Ok(()),
        };
        if matches!(&input.event, RawEvent::Event(e) if e.event_type == EventType::heartbeat) {
            // Event time for the profile's partition the heartbeat was produced to.
            // Not resolved, whatever identifiers it carries: the profile ignores
            // heartbeats, so a node it created or kept alive would be one the profile
            // never forgets, and the graph would keep it for good.
            // (The graph is one state partition: `ctx.partition` is always 0.)
            let key = self.heartbeat_key(&input.key, input.partition);
            let record = self.identified(input, "");
            ctx.emit(&self.identified_topic, &key, &record);
            return Ok(());
        }
        let customer = self.resolve(ctx, &input)?;
        tracing::trace!(event_id = input.event.event_id(), %customer, "resolved");
        let record = self.identified(input, &customer);
        ctx.emit(&self.identified_topic, &customer, &record);
        Ok(())
    }

    /// Only the expiry timers of earlier versions (`~anonymous/<profile>`) fire here:
    /// they did the forgetting by events alone, and forgot subscribers who only read
    /// their e-mails while the profile processor kept them. They end doing nothing.
    fn on_timer(&mut self, _ctx: &mut Ctx<'_>, _timer: &DueTimer) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The identity graph as it resolves now, read from a committed identity store (for
/// tests and tools). Two maps: every identifier and every known customer id with its
/// customer (`(shared)` for an identifier that stopped linking), which does not
/// depend on the order events arrived in; and every profile name, anonymous ones
/// included, with its customer.
pub struct ResolvedGraph {
    pub identifiers: std::collections::BTreeMap<String, String>,
    pub profiles: std::collections::BTreeMap<String, String>,
}

pub fn resolved_graph(store: &kairos_core::store::PartitionStore) -> anyhow::Result<ResolvedGraph> {
    let mut nodes = std::collections::BTreeMap::new();
    for (k, v) in store.scan_state(b"n/")? {
        let node: Node = kairos_core::encoding::decode_state(&v)?;
        nodes.insert(String::from_utf8_lossy(&k[2..]).into_owned(), node);
    }
    let canonical = |c: &str| {
        let mut current = c.to_string();
        for _ in 0..32 {
            match nodes.get(&current).and_then(|n| n.merged_into.clone()) {
                Some(next) => current = next,
                None => break,
            }
        }
        current
    };
    let mut identifiers = std::collections::BTreeMap::new();
    for (k, v) in store.scan_state(b"i/")? {
        let link: Link = kairos_core::encoding::decode_state(&v)?;
        let id = String::from_utf8_lossy(&k[2..]).into_owned();
        let owner = if link.shared {
            "(shared)".to_string()
        } else {
            canonical(&link.customer)
        };
        identifiers.insert(id, owner);
    }
    for (c, node) in &nodes {
        if node.known {
            identifiers.insert(format!("customer_id:{c}"), canonical(c));
        }
    }
    let profiles = nodes.keys().map(|c| (c.clone(), canonical(c))).collect();
    Ok(ResolvedGraph {
        identifiers,
        profiles,
    })
}

/// Runs the identity processor until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<kairos_core::admin::AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let registry = SchemaRegistry::new(config.schema_registry.url.clone());
    let processor = IdentityProcessor::new(config.clone(), registry.clone(), &admin.registry)?;
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_core::contracts::is_reserved_customer_id;

    #[test]
    fn every_name_identity_gives_a_profile_is_one_producers_may_not_use() {
        for kind in IdentifierKind::ALL {
            let name = anonymous_name(&Identifier {
                kind,
                value: "x".into(),
            });
            assert!(is_reserved_customer_id(&name), "{name}");
            let shared = format!("{name}{SHARED_IDENTIFIER_SUFFIX}");
            assert!(is_reserved_customer_id(&shared), "{shared}");
        }
    }

    /// A node stored by a version before `last_seen` (five fields) still reads, as
    /// one not seen since it was created.
    #[test]
    fn a_node_stored_before_it_kept_its_last_visit_still_reads() {
        let older = (
            true,
            1_700_000_000_000_i64,
            None::<String>,
            vec!["anon:a-1".to_string()],
            vec!["email:a@example.com".to_string()],
        );
        let bytes = kairos_core::encoding::encode_state(&older).expect("encode");
        let node: Node = kairos_core::encoding::decode_state(&bytes).expect("an older node reads");
        assert!(node.known);
        assert_eq!(node.first_seen, 1_700_000_000_000);
        assert_eq!(node.merged_from, ["anon:a-1"]);
        assert_eq!(node.identifiers, ["email:a@example.com"]);
        assert_eq!(node.last_seen, 0);
        assert!(!node.at_identifier_limit);
    }

    #[test]
    fn a_link_stored_under_a_unicode_domain_still_resolves_its_customer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = "[kafka]\npartitions = 1\n[identity]\nenabled = true\nmerge_on = [\"email\"]\n";
        let mut config = kairos_core::config::Config::from_text(
            std::path::Path::new("identity.toml"),
            text,
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        config.state.dir = dir.path().to_path_buf();
        config.clock.mode = kairos_core::time::ClockMode::Event;
        let config = std::sync::Arc::new(config);
        let registry = prometheus::Registry::new();
        let identity =
            IdentityProcessor::new(config.clone(), SchemaRegistry::new(None), &registry).unwrap();
        let mut replayer =
            kairos_core::replay::Replayer::new(identity, &config, &registry).unwrap();
        // The graph as a version that kept e-mails' Unicode domains wrote it.
        let state_partition = replayer.engine.state_partition(0);
        let store = replayer
            .engine
            .store(state_partition)
            .expect("open partition");
        let node = Node {
            known: true,
            first_seen: 1,
            identifiers: vec!["email:anna@bücher.example".into()],
            last_seen: 1,
            ..Node::default()
        };
        let link = Link {
            customer: "c-1".into(),
            claimants: vec!["c-1".into()],
            shared: false,
        };
        use kairos_core::encoding::encode_state;
        store
            .put_now(b"n/c-1", &encode_state(&node).unwrap())
            .unwrap();
        let legacy_key = "i/email:anna@bücher.example".as_bytes();
        store
            .put_now(legacy_key, &encode_state(&link).unwrap())
            .unwrap();

        let mut resolved = Vec::new();
        for (n, email) in ["Anna@BÜCHER.example", "anna@xn--bcher-kva.example"]
            .iter()
            .enumerate()
        {
            let event = serde_json::json!({
                "event_id": format!("e-{n}"),
                "event_type": "page_view",
                "occurred_at": "2026-03-02T09:00:00Z",
                "anonymous_id": format!("cookie-{n}"),
                "email": email,
            });
            let payload = serde_json::to_vec(&event).unwrap();
            let topic = config.topic(kairos_core::config::topics::SITE_EVENTS);
            let mut out = replayer.push(&topic, email.as_bytes(), &payload).unwrap();
            out.extend(replayer.commit().unwrap());
            resolved.extend(
                out.iter()
                    .filter(|o| o.topic.ends_with("identified-events"))
                    .map(|o| String::from_utf8_lossy(&o.key).into_owned()),
            );
        }
        assert_eq!(resolved, ["c-1", "c-1"]);
        let store = replayer
            .engine
            .store(state_partition)
            .expect("open partition");
        let links: Vec<String> = store
            .scan_state(b"i/email:")
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect();
        assert_eq!(links, ["i/email:anna@xn--bcher-kva.example"]);
        let (_, node) = &store.scan_state(b"n/c-1").unwrap()[0];
        let node: Node = kairos_core::encoding::decode_state(node).unwrap();
        let emails: Vec<&String> = (node.identifiers.iter())
            .filter(|i| i.starts_with("email:"))
            .collect();
        assert_eq!(emails, ["email:anna@xn--bcher-kva.example"]);
    }
}
