//! The customer profile kept per customer.

use std::collections::VecDeque;

use compact_str::CompactString;

use kairos_core::contracts::{
    Channel, CustomerEvent, EventType, LineItem, OrderStatus, Outcome, OutcomeKind, Product,
    ProfileField,
};
use kairos_core::ignored_row;
use kairos_core::small_map::SmallMap;
use kairos_core::time::Millis;
use serde::{Deserialize, Serialize};

/// Bounds that keep one profile small whatever the customer does.
const RECENT_EVENT_IDS: usize = 32;
const RECENTLY_VIEWED: usize = 20;
const RECENT_CATEGORIES: usize = 10;
const WISHLIST: usize = 50;
const RECENT_ORDERS: usize = 20;
/// Distinct products a cart holds (the earliest added leave first).
const MAX_CART_ITEMS: usize = 100;

/// A recently viewed product. Stored, like all state, as a row of its fields (see
/// `kairos_core::encoding::encode_state`): a profile holds up to 20 of these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ViewedProduct {
    pub product_id: CompactString,
    pub name: Option<CompactString>,
    pub category: Option<CompactString>,
    pub price: Option<f64>,
    pub at: Millis,
    /// When the catalog join last heard of a view of it (None in rows written before:
    /// the next view reports it again). Renewal counts from this, not from the latest
    /// view: views every few days must not keep postponing it.
    #[serde(default)]
    pub reported_at: Option<Millis>,
}

/// The latest cause of a restartable wait (abandoned cart, browse abandonment): every
/// cart change or view restarts the wait, but only this record changes; the armed
/// timer fires at or before the due time and moves itself (see `lib.rs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Wait {
    pub cause_event_id: String,
    pub cause_occurred_at: Millis,
    pub product: Option<Product>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelEngagement {
    pub last_delivered_at: Option<Millis>,
    pub last_opened_at: Option<Millis>,
    pub last_clicked_at: Option<Millis>,
    pub ignored_in_row: u32,
    /// When the messages counted in `ignored_in_row` were delivered (the latest
    /// `IGNORED_TIMES_KEPT`, in order): an open reported late, of an earlier message,
    /// ends the row only up to its own time.
    #[serde(default)]
    pub ignored_delivered_at: Vec<Millis>,
}

/// When a consent statement of event `e` counts, on a clock at `now`: its time, or
/// now for one a device dated ahead (within `clock.max_event_lead`). Statements are
/// ordered by time against the providers' unsubscribes: an opt-in dated hours ahead
/// would otherwise outrank every unsubscribe clicked before that hour, for good.
pub fn consent_stated_at(e: &CustomerEvent, now: Millis) -> Millis {
    e.occurred_at.min(now)
}

/// How many delivery times of ignored messages a channel's engagement keeps.
const IGNORED_TIMES_KEPT: usize = 32;

impl ChannelEngagement {
    /// The customer opened or clicked at `at`: the messages delivered after it are
    /// still ignored in a row, the earlier ones are not.
    fn engaged(&mut self, at: Millis) {
        ignored_row::end_row_at(
            &mut self.ignored_in_row,
            &mut self.ignored_delivered_at,
            at,
            IGNORED_TIMES_KEPT,
        );
    }

    fn engaged_at(&self) -> Option<Millis> {
        self.last_opened_at.max(self.last_clicked_at)
    }

    /// This channel's row as one side of a merge.
    fn ignored_row(&self) -> ignored_row::Row<'_> {
        ignored_row::Row {
            count: self.ignored_in_row,
            delivered_at: &self.ignored_delivered_at,
            reacted_at: self.engaged_at(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RfmScore {
    pub r: u8,
    pub f: u8,
    pub m: u8,
    pub segment: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CustomerProfile {
    pub customer_id: String,
    pub first_seen_at: Millis,
    pub last_seen_at: Millis,
    /// Last visit (any site or app activity).
    pub last_visit_at: Option<Millis>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub push_token: Option<String>,
    pub messenger_id: Option<String>,
    /// IANA time zone name.
    pub time_zone: Option<String>,
    /// `YYYY-MM-DD`.
    pub birthday: Option<String>,
    pub registered_at: Option<Millis>,
    pub subscription_ends_at: Option<Millis>,
    /// Marketing consent per channel, as last stated by the customer.
    pub consents: SmallMap<Channel, bool>,
    pub orders: u32,
    pub offline_orders: u32,
    pub revenue: f64,
    pub returns: u32,
    pub first_purchase_at: Option<Millis>,
    pub last_purchase_at: Option<Millis>,
    pub last_order_id: Option<String>,
    pub cart: Vec<LineItem>,
    pub cart_updated_at: Option<Millis>,
    pub recently_viewed: Vec<ViewedProduct>,
    pub recent_categories: Vec<CompactString>,
    pub wishlist: Vec<Product>,
    pub engagement: SmallMap<Channel, ChannelEngagement>,
    /// The latest address that bounced hard, per channel; all of them are in
    /// `bounced_addresses`. Still written so that an earlier version reading this row
    /// (a rollback during an upgrade) keeps suppressing the latest bounce.
    pub hard_bounced: SmallMap<Channel, String>,
    /// When the customer marked a message as spam.
    pub complained_at: Option<Millis>,
    pub lifecycle: Option<String>,
    pub rfm: Option<RfmScore>,
    /// Timers this profile knows are armed (scenario or review name -> fire time), so
    /// frequent events need no timer-index read.
    pub armed: SmallMap<CompactString, Millis>,
    /// Restartable waits by scenario name (see [`Wait`]).
    pub waits: SmallMap<CompactString, Wait>,
    /// The latest event ids (hash and hour, see `event_entry`), to drop duplicates:
    /// those of the last day, and at least the last 32.
    pub recent_event_ids: VecDeque<u64>,
    /// Customers the identity processor merged into this one whose profile has not
    /// arrived yet: triggers wait in state until it has.
    pub awaiting_merges: Vec<String>,
    /// Customers merged into this one (newest last, bounded), for the arbiter.
    pub merged_from: Vec<String>,
    /// When each channel's consent in `consents` was stated: a statement older than
    /// it (an unsubscribe outcome arriving after a newer opt-in) changes nothing.
    pub consent_at: SmallMap<Channel, Millis>,
    /// The latest orders (online and offline), newest last, bounded: a re-sent order
    /// counts once, and a return or cancellation without an amount reverses its own.
    pub recent_orders: Vec<OrderRecord>,
    /// Receipt ids of the latest till refunds, bounded: a refund uploaded again counts
    /// once.
    pub recent_refunds: Vec<String>,
    /// Hashes of the latest outcome ids, apart from `recent_event_ids`: a burst of
    /// delivery outcomes must not push out the event ids a producer may retry.
    #[serde(default)]
    pub recent_outcome_ids: VecDeque<u64>,
    /// The customer's first marketing opt-in (a subscription): it starts a welcome
    /// series as a registration does, one series for both. None in rows written before
    /// (their registration stands for the welcome).
    #[serde(default)]
    pub subscribed_at: Option<Millis>,
    /// When each contact and profile field was last stated ([`field`] codes): topics
    /// are consumed independently, so an older statement arriving later changes
    /// nothing.
    #[serde(default)]
    pub stated_at: SmallMap<u8, Millis>,
    /// Every address that bounced hard per channel, the latest few (`hard_bounced`
    /// holds only the latest, so a late bounce of an old address would free a bounced
    /// newer one).
    #[serde(default)]
    pub bounced_addresses: SmallMap<Channel, Vec<String>>,
    /// Set on rows created by a version that records every first opt-in in
    /// `subscribed_at`: on such a row a stated consent without `subscribed_at` was a
    /// withdrawal, so a later grant is the first opt-in. Older rows (false) cannot
    /// tell, and a stated consent counts as an earlier opt-in there.
    #[serde(default)]
    pub opt_ins_tracked: bool,
    /// Removals from the cart that found less of their product than they took away
    /// (see [`PendingCartRemoval`]), oldest first, bounded.
    #[serde(default)]
    pub pending_cart_removals: Vec<PendingCartRemoval>,
    /// Returns and cancellations of orders not among `recent_orders` when they came
    /// (see [`EarlyReversal`]), oldest first, bounded.
    #[serde(default)]
    pub early_reversals: Vec<EarlyReversal>,
    /// When each restartable wait last fired a step (or skipped one as late), by
    /// scenario: a cart change or view dated before it, arriving late from another
    /// device's topic, would have restarted the wait before that step in time order,
    /// so it restarts nothing now (it would send the step a second time).
    #[serde(default)]
    pub wait_step_fired_at: SmallMap<CompactString, Millis>,
    /// When the anonymous-retention timer of a profile Kairos named itself (`anon:`,
    /// `device:`, `card:`...) is due; `None`: not armed (a known customer, or
    /// retention off). The timer moves only when it fires, to the last event plus the
    /// retention, so a visitor's events cost no timer write.
    #[serde(default)]
    pub anonymous_expiry_at: Option<Millis>,
    /// What the customer last did with a product besides viewing it (bought it, put
    /// it on the wishlist, took it off), the latest few: see [`ProductMark`].
    #[serde(default)]
    pub product_marks: Vec<ProductMark>,
    /// Till refunds the revenue could not cover when they came (the refund's time, the
    /// part not taken), oldest first, bounded: a sale dated before one and read after
    /// it (its receipt uploaded late) pays it off, as it would have in time order.
    #[serde(default)]
    pub refund_shortfalls: Vec<(Millis, f64)>,
    /// The latest purchase that named no order (not among `recent_orders`): when a
    /// cancelled order was the latest purchase, the recency falls back to it too.
    #[serde(default)]
    pub last_unkeyed_purchase_at: Option<Millis>,
    /// Addresses moved from this customer to the customer who presented them (see
    /// [`CustomerProfile::release_identifier`]), the latest few: a merged profile still
    /// on its way (an anonymous one stitched to this customer before the move) does not
    /// bring one back.
    #[serde(default)]
    pub released_addresses: Vec<ReleasedAddress>,
    /// Since when the e-mail (`field::EMAIL`) and phone (`field::PHONE`) have been the
    /// address they are: the earliest statement of that address since the last change
    /// (`stated_at` keeps the latest). A consent given since goes with the address
    /// when it moves to its holder (see `drop_address`).
    #[serde(default)]
    pub address_since: SmallMap<u8, Millis>,
}

/// An address moved from a customer to the customer who presented it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleasedAddress {
    /// `email:ann@example.com`, normalized.
    pub identifier: String,
    /// Whose it is now.
    pub holder: String,
}

/// Whose statement decides a channel's consent when two profiles merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsentSpeaker {
    /// Two different addresses: the survivor keeps its own, and its own statement.
    Survivor,
    /// Only this side has an address: its statement, which the other side's (said of
    /// no address) can withdraw when later but never grant.
    AddressOf(Side),
    /// The same address, or none: the later statement.
    Later,
}

/// One of the two profiles of a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Survivor,
    Merged,
}

/// A statement of consent: granted or not, and when (unknown on rows from before
/// times were kept).
type Statement = (bool, Option<Millis>);

/// A channel's consent after a merge, from the survivor's statement `mine` and the
/// merged profile's `theirs` (see [`ConsentSpeaker`]); none: no consent stated.
fn merged_consent(
    speaker: ConsentSpeaker,
    mine: Option<Statement>,
    theirs: Option<Statement>,
) -> Option<Statement> {
    // The later one; at the same time, or without both times, a withdrawal wins.
    let later = |a: Statement, b: Statement| match (a.1, b.1) {
        (Some(x), Some(y)) if x > y => a,
        (Some(x), Some(y)) if y > x => b,
        (x, y) => (a.0 && b.0, x.max(y)),
    };
    match speaker {
        ConsentSpeaker::Survivor => mine,
        ConsentSpeaker::AddressOf(side) => {
            let (holder, other) = match side {
                Side::Survivor => (mine, theirs),
                Side::Merged => (theirs, mine),
            };
            match (holder, other) {
                (holder, None) => holder,
                // Said of no address: only a withdrawal carries over.
                (None, Some(other)) => (!other.0).then_some(other),
                (Some(holder), Some(other)) => {
                    let latest = later(holder, other);
                    Some(if latest == other && other.0 {
                        holder
                    } else {
                        latest
                    })
                }
            }
        }
        ConsentSpeaker::Later => match (mine, theirs) {
            (Some(a), Some(b)) => Some(later(a, b)),
            (a, b) => a.or(b),
        },
    }
}

/// When the customer last bought a product, put it on the wishlist and took it off.
/// A price drop or a return to stock is news only for a product still wanted, and
/// wishlist changes read out of order (the site's and the app's topics are consumed
/// independently) must end as in time order: a removal read before its addition keeps
/// the wish away. Fields may only be appended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProductMark {
    pub product_id: CompactString,
    pub bought_at: Option<Millis>,
    pub wished_at: Option<Millis>,
    pub unwished_at: Option<Millis>,
    /// The order (or till receipt) of `bought_at`: its cancellation undoes the mark.
    pub bought_in: Option<String>,
    /// The latest view of the product once it has a mark: a view after a purchase or
    /// a removal wants it again, also when it has left the latest twenty views.
    pub viewed_at: Option<Millis>,
    /// The price of the latest price drop the customer was sent a trigger for, and
    /// the time of its catalog change: a later drop is measured from it, unless they
    /// saw the product since (the catalog join announces every drop that may be news
    /// to someone, so without it each further step down would tell them again).
    pub told_price: Option<f64>,
    pub told_at: Option<Millis>,
    /// The highest `min_drop_percent` of the scenarios that told it: one with a
    /// higher threshold measures from the price the customer saw, not from it.
    pub told_up_to_percent: Option<f64>,
}

/// A price drop the customer was told of since they last saw the product (see
/// [`ProductMark::told_price`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Told {
    pub price: f64,
    pub up_to_percent: f64,
}

impl ProductMark {
    fn latest(&self) -> Option<Millis> {
        self.bought_at
            .max(self.wished_at)
            .max(self.unwished_at)
            .max(self.viewed_at)
            .max(self.told_at)
    }

    /// A wish taken off later than it was (last) made.
    fn unwished(&self) -> bool {
        self.unwished_at
            .is_some_and(|off| self.wished_at.is_none_or(|on| off >= on))
    }

    fn absorb(&mut self, other: &ProductMark) {
        if other.bought_at > self.bought_at {
            self.bought_at = other.bought_at;
            self.bought_in.clone_from(&other.bought_in);
        }
        self.wished_at = self.wished_at.max(other.wished_at);
        self.unwished_at = self.unwished_at.max(other.unwished_at);
        self.viewed_at = self.viewed_at.max(other.viewed_at);
        if other.told_at > self.told_at {
            self.told_at = other.told_at;
            self.told_price = other.told_price;
            self.told_up_to_percent = other.told_up_to_percent;
        }
    }
}

/// Product marks kept per customer besides those of the wishes on the wishlist (which
/// stay while the wish does): marks of purchases alone leave first, then removals,
/// the least recent first.
const PRODUCT_MARKS: usize = 32;

/// Whether a product occasion (a price drop, a return to stock) is news to the
/// customer, from what the profile knows of them and the product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProductAppeal {
    /// Still wanted; the price they last saw on it, if known, and the drop they were
    /// told of since, if any.
    Wanted {
        price_seen: Option<f64>,
        told: Option<Told>,
    },
    /// Bought since they last showed interest.
    Bought,
    /// Taken off the wishlist, and not viewed since.
    Unwished,
    /// Viewed after the change: they have seen the new price.
    SeenSince,
    /// Not on the wishlist (a return to stock is for wishes only).
    NotWished,
    /// Not wished, and last viewed before the audience window
    /// ([`crate::catalog::VIEW_INTEREST_DAYS`] before the change): the join keeps views
    /// by day, so it reaches the window's first day whole.
    ViewedLongAgo,
}

impl ProductAppeal {
    /// Every label [`Self::skip_reason`] gives.
    pub const SKIP_REASONS: [&'static str; 5] = [
        "already_bought",
        "unwished",
        "seen_since",
        "not_wished",
        "viewed_long_ago",
    ];

    /// The label of the skip it causes (`kairos_triggers_skipped_total`); `Wanted`
    /// causes none and is never counted.
    pub fn skip_reason(self) -> &'static str {
        match self {
            ProductAppeal::Wanted { .. } => "wanted",
            ProductAppeal::Bought => "already_bought",
            ProductAppeal::Unwished => "unwished",
            ProductAppeal::SeenSince => "seen_since",
            ProductAppeal::NotWished => "not_wished",
            ProductAppeal::ViewedLongAgo => "viewed_long_ago",
        }
    }
}

/// A return or cancellation of an order the profile did not hold when it came: the
/// order was counted long ago, or its purchase is still on its way (the site's and the
/// app's topics are consumed independently). For a customer of more orders than the
/// profile keeps its amount leaves the revenue at once, as for an old order; for the
/// others it cannot be an old one, and nothing is taken out. If the purchase comes
/// after all, it is applied as already returned or cancelled, with what was taken out
/// counted. Fields may only be appended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EarlyReversal {
    pub order_id: String,
    /// A cancellation (else a return).
    pub cancelled: bool,
    /// The amount it named; `None`: the whole order.
    pub amount: Option<f64>,
    /// What it took out of the revenue when it came.
    pub revenue_taken: f64,
    pub at: Millis,
    /// The lifecycle stage and RFM segment the customer held before it: a cancellation
    /// takes its order's revenue out at once, which can move the customer out of a
    /// segment, and its purchase read afterwards puts the customer back. That return
    /// is no new entry (in time order the customer never left), so it fires no
    /// `segment_entered` scenario.
    pub held_before: Vec<String>,
}

/// Early reversals kept per customer.
const MAX_EARLY_REVERSALS: usize = 8;

/// What a purchase did to the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurchaseApplied {
    /// A new purchase, counted (a return that came before it applied too).
    Counted,
    /// The order was counted before (a re-sent purchase).
    AlreadyCounted,
    /// Its cancellation came first: it counts for nothing, but what follows a
    /// checkout (the cart reminder ended, the arbiter told) happens as it would have
    /// with the purchase read first.
    CancelledBefore,
}

/// A removal from the cart that found less of its product than it took away: the
/// addition it undoes was made earlier on a device whose topic has not delivered it
/// yet (the site's and the app's topics are consumed independently). An addition made
/// before the removal that arrives later is cancelled against it, so the cart ends the
/// same in any arrival order. Fields may only be appended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PendingCartRemoval {
    pub product_id: CompactString,
    /// How many the removal took away beyond what the cart held.
    pub quantity: i32,
    /// When the removal was made: only additions made no later are cancelled.
    pub at: Millis,
}

/// How long a removal waits for the late addition it undoes: topics lag one another by
/// seconds or minutes, and an addition later than this (after an outage) stays.
const PENDING_CART_REMOVAL_WINDOW: Millis = kairos_core::time::DAY;
/// Pending removals kept per customer.
const MAX_PENDING_CART_REMOVALS: usize = 8;

/// Hard-bounced addresses remembered per channel (as many as the arbiter keeps).
const MAX_BOUNCED_ADDRESSES: usize = 8;

/// Codes of the fields in [`CustomerProfile::stated_at`]: stored, never reused.
pub mod field {
    pub const EMAIL: u8 = 1;
    pub const PHONE: u8 = 2;
    pub const TIME_ZONE: u8 = 3;
    pub const BIRTHDAY: u8 = 4;
    pub const SUBSCRIPTION_ENDS_AT: u8 = 5;
    pub const FIRST_NAME: u8 = 6;
    pub const LAST_NAME: u8 = 7;
    pub const PUSH_TOKEN: u8 = 8;
    pub const MESSENGER_ID: u8 = 9;
}

/// Addresses moved away kept per customer (see `released_addresses`).
const MAX_RELEASED_ADDRESSES: usize = 8;

/// Notes `moved` among the addresses moved away, the latest few; an address moved on
/// again is noted with its latest holder only.
fn note_released(released: &mut Vec<ReleasedAddress>, moved: ReleasedAddress) {
    released.retain(|known| known.identifier != moved.identifier);
    if released.len() >= MAX_RELEASED_ADDRESSES {
        released.remove(0);
    }
    released.push(moved);
}

/// Whether two stored addresses are one: an e-mail stored before domains were
/// normalized may be the other's in its Unicode spelling, or in another case.
fn same_contact(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    a.eq_ignore_ascii_case(b) || kairos_core::identifiers::same_address(a, b)
}

/// What becomes of a consent given with an address that moved away (see
/// `CustomerProfile::drop_address`).
enum ConsentWithAddress {
    /// On the profile that had the address: withdrawn as of its time, so that no
    /// earlier statement read late takes its place.
    Withdrawn,
    /// On a profile merging in: no statement of the survivor's at all, so it does not
    /// outweigh the survivor's own.
    Forgotten,
}

/// Whether `code` is a field that holds an address whose moves are followed.
fn is_address(code: u8) -> bool {
    code == field::EMAIL || code == field::PHONE
}

/// Records that `field` was stated at `at`; false (and nothing recorded) when a later
/// statement of it is known. At the same time, the later arrival wins.
fn newer_statement(stated_at: &mut SmallMap<u8, Millis>, field: u8, at: Millis) -> bool {
    if stated_at.get(&field).is_some_and(|known| *known > at) {
        return false;
    }
    stated_at.insert(field, at);
    true
}

/// One order as the profile remembers it (see [`CustomerProfile::recent_orders`]).
/// Fields may only be appended, and read as their defaults from rows written before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrderRecord {
    pub order_id: String,
    pub total: f64,
    pub at: Millis,
    /// Returned, refunded or cancelled: its amount is out of the revenue already.
    pub reversed: bool,
    /// A till sale (counted in `offline_orders` as well).
    pub offline: bool,
    /// The statuses seen for it, one bit each (see [`status_bit`]): a status re-sent
    /// under a new event id applies once.
    #[serde(default)]
    pub statuses: u8,
    /// When it was delivered: a merge re-arms the merged customer's NPS survey from it.
    #[serde(default)]
    pub delivered_at: Option<Millis>,
    /// Cancelled (not merely returned): its time no longer counts as a purchase.
    #[serde(default)]
    pub cancelled: bool,
    /// What partial returns took out of it so far; `reversed` once it is all back.
    #[serde(default)]
    pub returned_amount: f64,
    /// The partial returns applied to it (see [`return_part_key`]), the latest few: a
    /// part re-sent under a new event id applies once.
    #[serde(default)]
    pub returned_parts: Vec<u64>,
}

impl OrderRecord {
    /// Notes the statuses and parts of reversals that came before the order, so that
    /// one re-sent now applies once.
    fn note_reversals<'a>(&mut self, came_first: impl Iterator<Item = &'a EarlyReversal>) {
        for r in came_first {
            let status = if r.cancelled {
                OrderStatus::cancelled
            } else {
                OrderStatus::returned
            };
            self.statuses |= status_bit(status);
            if !r.cancelled {
                if self.returned_parts.len() >= MAX_RETURNED_PARTS {
                    self.returned_parts.remove(0);
                }
                self.returned_parts.push(return_part_key(r.at, r.amount));
            }
        }
    }
}

/// Partial returns remembered per order; an order is seldom sent back in more parts.
const MAX_RETURNED_PARTS: usize = 8;

/// A partial return by its time and amount (`None`: the rest of the order). Stored in
/// state, so fixed here rather than left to a hasher that may change.
fn return_part_key(at: Millis, total: Option<f64>) -> u64 {
    (at as u64).rotate_left(21) ^ total.map_or(u64::MAX, f64::to_bits)
}

/// The bit of `status` in [`OrderRecord::statuses`]: fixed here, stored in state.
fn status_bit(status: OrderStatus) -> u8 {
    match status {
        OrderStatus::placed => 1,
        OrderStatus::shipped => 2,
        OrderStatus::delivered => 4,
        OrderStatus::returned => 8,
        OrderStatus::cancelled => 16,
    }
}

/// Adds `h` to a bounded ring of recent id hashes; false if it was there already.
fn remember_hash(ring: &mut VecDeque<u64>, h: u64) -> bool {
    if ring.contains(&h) {
        return false;
    }
    if ring.len() >= RECENT_EVENT_IDS {
        ring.pop_front();
    }
    ring.push_back(h);
    true
}

/// How long an event id is remembered to drop a producer's retry, whatever number of
/// events the customer sent since (at least the last `RECENT_EVENT_IDS` are kept). In
/// hours as stamped: an entry 24 hour-numbers back is 23 to 25 hours old, kept.
pub const EVENT_DEDUP_WINDOW_HOURS: i64 = 24;
/// At most this many event ids per customer (a bot's burst of events).
const MAX_EVENT_IDS: usize = 512;
/// An event id entry: the id's hash in the low 48 bits, the event's hour (since the
/// epoch, modulo 2^16) in the high 16, so the ring keeps its stored form (one `u64`
/// per id) and can still tell how old each entry is. Entries written before the hour
/// was packed carry a full hash; only the low 48 bits are compared, so they match as
/// before, and their top bits read as an arbitrary hour (at worst an old entry beyond
/// the last 32 goes early or stays within the bound).
const EVENT_HASH_BITS: u32 = 48;
const EVENT_HASH_MASK: u64 = (1 << EVENT_HASH_BITS) - 1;

/// The hour of `at` as an entry keeps it (since the epoch, modulo 2^16).
fn stamp_hour(at: Millis) -> u16 {
    (at.div_euclid(3_600_000) as u64 & 0xFFFF) as u16
}

fn event_entry(hash: u64, at: Millis) -> u64 {
    (u64::from(stamp_hour(at)) << EVENT_HASH_BITS) | (hash & EVENT_HASH_MASK)
}

/// Appends an entry, the oldest going first once the ring holds `MAX_EVENT_IDS`.
fn push_event_entry(ring: &mut VecDeque<u64>, entry: u64) {
    if ring.len() >= MAX_EVENT_IDS {
        ring.pop_front();
    }
    ring.push_back(entry);
}

/// Whether two event id entries (or a hash and an entry) name the same id.
fn same_event_id(a: u64, b: u64) -> bool {
    a & EVENT_HASH_MASK == b & EVENT_HASH_MASK
}

/// Hours from the entry's event to `at` (negative for a later event).
fn entry_age_hours(entry: u64, at: Millis) -> i64 {
    let entry_hour = (entry >> EVENT_HASH_BITS) as u16;
    i64::from(stamp_hour(at).wrapping_sub(entry_hour) as i16)
}

/// Adds an event id's `hash` to the customer's event ids, stamped `now` (the
/// processor's clock): false if it was there already. The last `RECENT_EVENT_IDS` stay
/// whatever their age; beyond them, those read in the day before `now` (up to
/// `MAX_EVENT_IDS`). Read time, not the event's: a phone's offline queue of events
/// two days old, sent twice, is a retry like any other. A stamp an hour ahead is
/// another instance's, whose clock ran a little ahead (the partition moved here), and
/// counts as recent; one further ahead was written before stamps were packed, and
/// counts as old.
fn remember_event_hash(ring: &mut VecDeque<u64>, hash: u64, now: Millis) -> bool {
    if ring.iter().any(|e| same_event_id(*e, hash)) {
        return false;
    }
    if ring.len() >= RECENT_EVENT_IDS {
        // With this one, the newest of these make the last `RECENT_EVENT_IDS`.
        let recent_from = ring.len() + 1 - RECENT_EVENT_IDS;
        let mut n = 0;
        ring.retain(|e| {
            let recent = n >= recent_from;
            n += 1;
            recent || (-1..=EVENT_DEDUP_WINDOW_HOURS).contains(&entry_age_hours(*e, now))
        });
    }
    push_event_entry(ring, event_entry(hash, now));
    true
}

/// What a merge's two profiles both counted of the orders they share.
#[derive(Default)]
struct CountedTwice {
    orders: u32,
    offline: u32,
    revenue: f64,
    returns: u32,
    /// Times of shared orders one copy knew cancelled and the other counted as
    /// purchases: no purchase time once merged.
    cancelled_at: Vec<Millis>,
}

impl CountedTwice {
    /// Keeps one record of an order both profiles hold in `mine`: theirs if it saw
    /// more of the order's reversals. The other's share of the sums is noted.
    fn keep_one(&mut self, mine: &mut OrderRecord, theirs: OrderRecord) {
        let theirs_further = (theirs.cancelled && !mine.cancelled)
            || (theirs.cancelled == mine.cancelled
                && theirs.returned_amount > mine.returned_amount + 1e-9);
        let statuses = mine.statuses | theirs.statuses;
        let delivered_at = mine.delivered_at.max(theirs.delivered_at);
        let shared_parts = mine
            .returned_parts
            .iter()
            .filter(|part| theirs.returned_parts.contains(part))
            .count();
        let dropped = if theirs_further {
            std::mem::replace(mine, theirs)
        } else {
            theirs
        };
        mine.statuses = statuses;
        mine.delivered_at = delivered_at;
        if mine.cancelled && !dropped.cancelled {
            self.cancelled_at.extend([mine.at, dropped.at]);
        }
        // A cancellation took the order out of the count and its amount out of the
        // revenue; a return took out what it returned.
        if !dropped.cancelled {
            self.orders += 1;
            self.offline += u32::from(dropped.offline);
        }
        self.revenue += (dropped.total - dropped.returned_amount).max(0.0);
        self.returns += u32::try_from(shared_parts).unwrap_or(u32::MAX);
    }
}

/// A wish added to a profile, with the oldest one the cap pushed out.
#[derive(Debug, PartialEq)]
pub struct WishlistAdded {
    pub pushed_out: Option<Product>,
}

/// What a return, refund or cancellation did to the purchase aggregates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reversal {
    /// The amount left the revenue; `known` says whether the order is among the
    /// recent ones (whose follow-up checks the mark when it fires).
    Applied { known: bool },
    /// The order was reversed before, or the refund counted before: nothing changed.
    AlreadyReversed,
}

/// Why an order is reversed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReversalKind {
    /// Returned: still an order, its amount out of the revenue.
    Return,
    /// Cancelled before it was fulfilled: no order at all.
    Cancellation,
}

impl CustomerProfile {
    /// The customer's latest activity, as reactivation counts it: a visit, or a
    /// purchase (a till receipt too).
    pub fn last_active_at(&self) -> Option<Millis> {
        self.last_visit_at.max(self.last_purchase_at)
    }

    pub fn new(customer_id: &str, at: Millis) -> Self {
        CustomerProfile {
            customer_id: customer_id.to_string(),
            first_seen_at: at,
            last_seen_at: at,
            opt_ins_tracked: true,
            ..Default::default()
        }
    }

    /// Whether the customer opted in to marketing before: a later grant is then no
    /// first opt-in and starts no subscription welcome.
    pub fn opted_in_before(&self) -> bool {
        self.subscribed_at.is_some()
            || (!self.opt_ins_tracked
                && (self.consents.values().any(|granted| *granted)
                    || !self.consent_at.is_empty()
                    || !self.consents.is_empty()))
    }

    /// The address the customer has for `channel`, if any.
    pub fn address(&self, channel: Channel) -> Option<&String> {
        match channel {
            Channel::email => self.email.as_ref(),
            Channel::sms => self.phone.as_ref(),
            Channel::push => self.push_token.as_ref(),
            Channel::messenger => self.messenger_id.as_ref(),
            Channel::in_app | Channel::webhook => None,
        }
    }

    /// Folds a delivery or engagement outcome into engagement and suppressions.
    pub fn apply_outcome(&mut self, o: &Outcome) {
        let at = o.occurred_at;
        match o.kind {
            OutcomeKind::unsubscribed => {
                self.state_consent(o.channel, false, at);
            }
            OutcomeKind::bounced_hard => {
                // The address the send went to: a bounce reported after the customer
                // changed it must not block the new one. Without one (a provider's
                // report whose address did not read) the arbiter bars the send's
                // address by its id; the profile cannot tell which it was.
                if let Some(address) = o.address.clone() {
                    self.note_bounced(o.channel, address);
                }
            }
            OutcomeKind::complained => {
                self.complained_at.get_or_insert(at);
            }
            _ => {}
        }
        let e = self.engagement.entry(o.channel).or_default();
        match o.kind {
            OutcomeKind::delivered => {
                e.last_delivered_at = Some(e.last_delivered_at.map_or(at, |l| l.max(at)));
                // Ignored until an open or click says otherwise; one reported after an
                // open or click at or after it (webhooks come in any order) is not.
                let engaged = e.last_opened_at.max(e.last_clicked_at);
                if engaged.is_none_or(|engaged| engaged < at) {
                    e.ignored_in_row += 1;
                    let times = &mut e.ignored_delivered_at;
                    let place = times.partition_point(|delivered| *delivered <= at);
                    times.insert(place, at);
                    if times.len() > IGNORED_TIMES_KEPT {
                        times.remove(0);
                    }
                }
            }
            OutcomeKind::opened => {
                e.last_opened_at = Some(e.last_opened_at.map_or(at, |l| l.max(at)));
                e.engaged(at);
            }
            OutcomeKind::clicked => {
                e.last_clicked_at = Some(e.last_clicked_at.map_or(at, |l| l.max(at)));
                e.engaged(at);
            }
            _ => {}
        }
    }

    /// Folds in the profile of a customer found to be the same person (an identity
    /// merge): purchases add up, a channel's consent follows the address kept (the
    /// survivor's own if it has one; for one same address, the later statement, a
    /// withdrawal winning a tie), the newer cart and the union of interests stay.
    /// Waits and segments are the processor's to re-arm and review.
    pub fn absorb(&mut self, mut other: CustomerProfile) {
        fn min_some(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        self.take_released_addresses(&mut other);
        // Whose word on a channel's consent counts: the one whose address the
        // survivor keeps (below, its own if it has one).
        let speaks_for = |channel: Channel| -> ConsentSpeaker {
            match (self.address(channel), other.address(channel)) {
                (Some(mine), Some(theirs)) if !same_contact(mine, theirs) => {
                    ConsentSpeaker::Survivor
                }
                (Some(_), None) => ConsentSpeaker::AddressOf(Side::Survivor),
                (None, Some(_)) => ConsentSpeaker::AddressOf(Side::Merged),
                _ => ConsentSpeaker::Later,
            }
        };
        let speakers: Vec<(Channel, ConsentSpeaker)> =
            Channel::ALL.iter().map(|c| (*c, speaks_for(*c))).collect();
        let speaker_of = |channel: Channel| {
            speakers
                .iter()
                .find(|(c, _)| *c == channel)
                .map_or(ConsentSpeaker::Later, |(_, s)| *s)
        };
        self.first_seen_at = self.first_seen_at.min(other.first_seen_at);
        self.last_seen_at = self.last_seen_at.max(other.last_seen_at);
        self.last_visit_at = self.last_visit_at.max(other.last_visit_at);
        // The survivor's own value stays; one it lacks comes from the other, unless the
        // survivor cleared it after the other stated it (a number removed stays removed).
        let (mine_at, theirs_at) = (&self.stated_at, &other.stated_at);
        let cleared_after = |code: u8| {
            mine_at
                .get(&code)
                .is_some_and(|cleared| theirs_at.get(&code).is_none_or(|t| t <= cleared))
        };
        // The same address on both sides: held since the earlier of the two.
        let held_since = |p: &CustomerProfile, code: u8| {
            (p.address_since.get(&code))
                .or(p.stated_at.get(&code))
                .copied()
        };
        let mut same_held = Vec::new();
        for (code, mine, theirs) in [
            (field::EMAIL, &self.email, &other.email),
            (field::PHONE, &self.phone, &other.phone),
        ] {
            if let (Some(mine), Some(theirs)) = (mine, theirs) {
                if same_contact(mine, theirs) {
                    let earliest = held_since(self, code)
                        .into_iter()
                        .chain(held_since(&other, code))
                        .min();
                    same_held.extend(earliest.map(|at| (code, at)));
                }
            }
        }
        // The fields whose value came from the other: they take its statement's time.
        let mut taken: Vec<u8> = Vec::new();
        let mut keep = |code: u8, mine: &mut Option<String>, theirs: Option<String>| {
            if mine.is_none() && theirs.is_some() && !cleared_after(code) {
                *mine = theirs;
                taken.push(code);
            }
        };
        keep(field::FIRST_NAME, &mut self.first_name, other.first_name);
        keep(field::LAST_NAME, &mut self.last_name, other.last_name);
        keep(field::EMAIL, &mut self.email, other.email);
        keep(field::PHONE, &mut self.phone, other.phone);
        keep(field::PUSH_TOKEN, &mut self.push_token, other.push_token);
        keep(
            field::MESSENGER_ID,
            &mut self.messenger_id,
            other.messenger_id,
        );
        keep(field::TIME_ZONE, &mut self.time_zone, other.time_zone);
        keep(field::BIRTHDAY, &mut self.birthday, other.birthday);
        // A subscription's end: the later statement's (a removed end included), else
        // the later end.
        let code = field::SUBSCRIPTION_ENDS_AT;
        let (mine_end, theirs_end) = (self.subscription_ends_at, other.subscription_ends_at);
        let theirs_wins = match (mine_at.get(&code), theirs_at.get(&code)) {
            (Some(mine), Some(theirs)) => theirs > mine,
            (Some(_), None) => false,
            _ => theirs_end > mine_end,
        };
        if theirs_wins {
            self.subscription_ends_at = theirs_end;
            taken.push(code);
        }
        // Each field's statement time is that of the value kept: a later statement
        // of the survivor's own, read late, still applies.
        for code in taken {
            if let Some(at) = theirs_at.get(&code) {
                self.stated_at.insert(code, *at);
            }
            match other.address_since.get(&code) {
                Some(since) => self.address_since.insert(code, *since),
                None => self.address_since.remove(&code),
            };
        }
        self.address_since.extend(same_held);
        self.registered_at = min_some(self.registered_at, other.registered_at);
        self.subscribed_at = min_some(self.subscribed_at, other.subscribed_at);
        // An older row's consents may hide an opt-in it never timed.
        self.opt_ins_tracked &= other.opt_ins_tracked;
        // Merges the other one still waited for are the survivor's to wait for now.
        for awaited in other.awaiting_merges {
            let known = self.awaiting_merges.contains(&awaited)
                || self.merged_from.contains(&awaited)
                || awaited == self.customer_id;
            if !known {
                self.awaiting_merges.push(awaited);
            }
        }
        for (code, at) in other.stated_at {
            self.stated_at.entry(code).or_insert(at);
        }
        for channel in Channel::ALL {
            let statement = |consents: &SmallMap<Channel, bool>, at: &SmallMap<Channel, Millis>| {
                consents
                    .get(&channel)
                    .map(|granted| (*granted, at.get(&channel).copied()))
            };
            let mine = statement(&self.consents, &self.consent_at);
            let theirs = statement(&other.consents, &other.consent_at);
            if mine.is_none() && theirs.is_none() {
                continue;
            }
            match merged_consent(speaker_of(channel), mine, theirs) {
                Some((granted, at)) => {
                    self.consents.insert(channel, granted);
                    match at {
                        Some(at) => self.consent_at.insert(channel, at),
                        None => self.consent_at.remove(&channel),
                    };
                }
                None => {
                    self.consents.remove(&channel);
                    self.consent_at.remove(&channel);
                }
            }
        }
        // An order both ids counted (a guest checkout and the account's backend, each
        // told of it) counts once: the copy that saw more of its reversals stays, and
        // what the other added to the sums comes out of them below.
        let mut counted_twice = CountedTwice::default();
        for order in other.recent_orders {
            match self.order_index(&order.order_id, order.offline) {
                None => self.recent_orders.push(order),
                Some(n) => counted_twice.keep_one(&mut self.recent_orders[n], order),
            }
        }
        // The same reversal read by both ids: each took its amount out of its own
        // revenue and counted its own return, which the merge adds up. One entry
        // gives back both amounts, and the second return is not one.
        let mut returns_read_twice = 0;
        for reversal in other.early_reversals {
            let mine = self.early_reversals.iter_mut().find(|r| {
                (&r.order_id, r.cancelled, r.amount, r.at)
                    == (
                        &reversal.order_id,
                        reversal.cancelled,
                        reversal.amount,
                        reversal.at,
                    )
            });
            match mine {
                Some(mine) => {
                    mine.revenue_taken += reversal.revenue_taken;
                    for held in reversal.held_before {
                        if !mine.held_before.contains(&held) {
                            mine.held_before.push(held);
                        }
                    }
                    if !reversal.cancelled {
                        returns_read_twice += 1;
                    }
                }
                None => self.early_reversals.push(reversal),
            }
        }
        self.orders = (self.orders + other.orders).saturating_sub(counted_twice.orders);
        self.offline_orders =
            (self.offline_orders + other.offline_orders).saturating_sub(counted_twice.offline);
        self.revenue = (self.revenue + other.revenue - counted_twice.revenue).max(0.0);
        self.returns = (self.returns + other.returns)
            .saturating_sub(returns_read_twice + counted_twice.returns);
        self.first_purchase_at = min_some(self.first_purchase_at, other.first_purchase_at);
        if other.last_purchase_at > self.last_purchase_at {
            self.last_purchase_at = other.last_purchase_at;
            self.last_order_id = other.last_order_id;
        }
        for at in counted_twice.cancelled_at {
            self.forget_purchase_time(at);
        }
        // Before either list is cut to its bound, so that no reversal whose order is
        // here now is dropped unsettled.
        self.settle_early_reversals();
        self.early_reversals.sort_by_key(|r| r.at);
        let excess = self
            .early_reversals
            .len()
            .saturating_sub(MAX_EARLY_REVERSALS);
        self.early_reversals.drain(..excess);
        for refund in other.recent_refunds {
            if !self.recent_refunds.contains(&refund) {
                self.recent_refunds.push(refund);
            }
        }
        self.refund_shortfalls.extend(other.refund_shortfalls);
        self.refund_shortfalls.sort_by_key(|(at, _)| *at);
        self.last_unkeyed_purchase_at =
            (self.last_unkeyed_purchase_at).max(other.last_unkeyed_purchase_at);
        let excess = self
            .refund_shortfalls
            .len()
            .saturating_sub(MAX_EARLY_REVERSALS);
        self.refund_shortfalls.drain(..excess);
        let excess = self.recent_refunds.len().saturating_sub(RECENT_ORDERS);
        self.recent_refunds.drain(..excess);
        self.recent_orders.sort_by_key(|o| o.at);
        let excess = self.recent_orders.len().saturating_sub(RECENT_ORDERS);
        self.recent_orders.drain(..excess);
        if other.cart_updated_at > self.cart_updated_at {
            self.cart = other.cart;
            self.cart_updated_at = other.cart_updated_at;
            self.pending_cart_removals = other.pending_cart_removals;
        }
        for v in other.recently_viewed {
            match self
                .recently_viewed
                .iter_mut()
                .find(|x| x.product_id == v.product_id)
            {
                Some(mine) if mine.at < v.at => *mine = v,
                Some(_) => {}
                None => self.recently_viewed.push(v),
            }
        }
        // Oldest first, as `view` keeps them (it drops the first when full).
        self.recently_viewed.sort_by_key(|v| v.at);
        let excess = self.recently_viewed.len().saturating_sub(RECENTLY_VIEWED);
        self.recently_viewed.drain(..excess);
        for (scenario, fired) in other.wait_step_fired_at {
            let mine = self.wait_step_fired_at.entry(scenario).or_insert(fired);
            *mine = (*mine).max(fired);
        }
        for c in other.recent_categories {
            if !self.recent_categories.contains(&c)
                && self.recent_categories.len() < RECENT_CATEGORIES
            {
                self.recent_categories.push(c);
            }
        }
        for w in other.wishlist {
            if !self.wishlist.iter().any(|x| x.product_id == w.product_id)
                && self.wishlist.len() < WISHLIST
            {
                self.wishlist.push(w);
            }
        }
        for mark in &other.product_marks {
            match self
                .product_marks
                .iter_mut()
                .find(|m| m.product_id == mark.product_id)
            {
                Some(mine) => mine.absorb(mark),
                None => self.product_marks.push(mark.clone()),
            }
        }
        // A wish one id took off after it was last made (on either id) stays off; one
        // whose time neither id knows any more (a row from before the marks) stays.
        let marks = &self.product_marks;
        self.wishlist.retain(|w| {
            !marks
                .iter()
                .any(|m| m.product_id == w.product_id && m.wished_at.is_some() && m.unwished())
        });
        self.trim_product_marks();
        for (channel, e) in other.engagement {
            let mine = self.engagement.entry(channel).or_default();
            // Both rows of ignored messages, up to the later customer's latest open
            // or click.
            let reacted_at = mine.engaged_at().max(e.engaged_at());
            let ignored = ignored_row::merge_rows(
                mine.ignored_row(),
                e.ignored_row(),
                reacted_at,
                IGNORED_TIMES_KEPT,
            );
            (mine.ignored_in_row, mine.ignored_delivered_at) = ignored;
            mine.last_delivered_at = mine.last_delivered_at.max(e.last_delivered_at);
            mine.last_opened_at = mine.last_opened_at.max(e.last_opened_at);
            mine.last_clicked_at = mine.last_clicked_at.max(e.last_clicked_at);
        }
        for (channel, address) in other.hard_bounced {
            self.note_bounced(channel, address);
        }
        for (channel, addresses) in other.bounced_addresses {
            for address in addresses {
                self.note_bounced(channel, address);
            }
        }
        self.complained_at = min_some(self.complained_at, other.complained_at);
        for entry in other.recent_event_ids {
            let known = self
                .recent_event_ids
                .iter()
                .any(|e| same_event_id(*e, entry));
            if !known {
                push_event_entry(&mut self.recent_event_ids, entry);
            }
        }
        for h in other.recent_outcome_ids {
            remember_hash(&mut self.recent_outcome_ids, h);
        }
    }

    /// Applies the early reversals whose order a merge brought in (the return reached
    /// one id, the purchase the other, before the identity processor joined them),
    /// oldest first: what each did when it came is undone, and it is applied again as
    /// the return or cancellation of an order the profile holds (`record_return`), so
    /// the revenue, the orders and the order's marks end as if both had come to one
    /// profile. One the order had taken already (the same reversal sent to both ids)
    /// is a repeat there, and only the undoing stays.
    fn settle_early_reversals(&mut self) {
        let mut reversals = std::mem::take(&mut self.early_reversals);
        reversals.sort_by_key(|r| r.at);
        for r in reversals {
            if self.order_named(&r.order_id).is_none() {
                self.early_reversals.push(r);
                continue;
            }
            self.revenue += r.revenue_taken;
            let (kind, status) = if r.cancelled {
                (ReversalKind::Cancellation, OrderStatus::cancelled)
            } else {
                self.returns = self.returns.saturating_sub(1);
                (ReversalKind::Return, OrderStatus::returned)
            };
            if self.record_return(&r.order_id, r.amount, r.at, kind) == Reversal::AlreadyReversed {
                continue;
            }
            // The status seen, so that one re-sent now applies once.
            if let Some(n) = self.order_named(&r.order_id) {
                self.recent_orders[n].statuses |= status_bit(status);
            }
        }
    }

    /// Records the id of an event read when the processor's clock reads `now`; false
    /// if it was seen already (a duplicate).
    pub fn remember_event(&mut self, event_id: &str, now: Millis) -> bool {
        // 48-bit hashes: a false duplicate needs a collision among at most 512 ids.
        remember_event_hash(
            &mut self.recent_event_ids,
            kairos_core::ids::stable_hash(event_id),
            now,
        )
    }

    /// Records an outcome id; false if it was seen already (a duplicate).
    pub fn remember_outcome(&mut self, outcome_id: &str) -> bool {
        let h = kairos_core::ids::stable_hash(outcome_id);
        // Earlier versions kept outcome ids among the event ids.
        let among_events = self.recent_event_ids.iter().any(|e| same_event_id(*e, h));
        !among_events && remember_hash(&mut self.recent_outcome_ids, h)
    }

    /// Contacts, consent and recency carried by any event; `now` is the processor's
    /// clock (see [`consent_stated_at`]).
    pub fn touch(&mut self, e: &CustomerEvent, now: Millis) {
        self.last_seen_at = self.last_seen_at.max(e.occurred_at);
        if is_visit(e.event_type) {
            self.last_visit_at = Some(
                self.last_visit_at
                    .map_or(e.occurred_at, |v| v.max(e.occurred_at)),
            );
        }
        if let Some(c) = &e.consent {
            self.state_consent(c.channel, c.granted, consent_stated_at(e, now));
        }
        // Each field keeps the latest statement by event time, whatever order the
        // topics delivered them in.
        let at = e.occurred_at;
        // On the consents' clock: a device dated ahead must not date the address after
        // the opt-in given with it.
        let since_at = consent_stated_at(e, now);
        let stated = &mut self.stated_at;
        let since = &mut self.address_since;
        // A blank value is no statement: forms send "" for a field left empty, and it
        // must not wipe out an address or name the customer gave before (a clearing
        // is named in `cleared`).
        let mut set = |code: u8, field: &mut Option<String>, v: Option<&String>| {
            if let Some(v) = v.filter(|v| !v.trim().is_empty()) {
                let same =
                    is_address(code) && field.as_deref().is_some_and(|held| same_contact(held, v));
                let newer = newer_statement(stated, code, at);
                if newer {
                    *field = Some(v.clone());
                }
                if is_address(code) && (same || newer) {
                    // Read in any order: the earliest statement of the address held.
                    let first =
                        (since.get(&code).filter(|_| same)).map_or(since_at, |s| since_at.min(*s));
                    since.insert(code, first);
                }
            }
        };
        set(field::EMAIL, &mut self.email, e.email.as_ref());
        set(field::PHONE, &mut self.phone, e.phone.as_ref());
        if let Some(u) = &e.profile {
            set(
                field::FIRST_NAME,
                &mut self.first_name,
                u.first_name.as_ref(),
            );
            set(field::LAST_NAME, &mut self.last_name, u.last_name.as_ref());
            set(field::EMAIL, &mut self.email, u.email.as_ref());
            set(field::PHONE, &mut self.phone, u.phone.as_ref());
            set(
                field::PUSH_TOKEN,
                &mut self.push_token,
                u.push_token.as_ref(),
            );
            set(
                field::MESSENGER_ID,
                &mut self.messenger_id,
                u.messenger_id.as_ref(),
            );
            set(field::TIME_ZONE, &mut self.time_zone, u.time_zone.as_ref());
            set(field::BIRTHDAY, &mut self.birthday, u.birthday.as_ref());
            if let Some(ends) = u.subscription_ends_at {
                if newer_statement(&mut self.stated_at, field::SUBSCRIPTION_ENDS_AT, at) {
                    self.subscription_ends_at = Some(ends);
                }
            }
            // Absent and null read the same in the contract, so a clearing is named;
            // it is a statement like any other (after a value in the same update).
            for cleared in &u.cleared {
                self.clear(*cleared, at);
            }
        }
    }

    /// A till receipt's phone number fills in a profile without one, unless the
    /// customer stated theirs (or cleared it) after the receipt: one uploaded late
    /// does not bring back a number the customer removed. It is no statement of the
    /// customer's own (a till's clock may run ahead): any of theirs still replaces it.
    pub fn phone_from_receipt(&mut self, phone: &str, at: Millis) {
        let stated_later = self.stated_at.get(&field::PHONE).is_some_and(|k| *k > at);
        if self.phone.is_none() && !phone.trim().is_empty() && !stated_later {
            self.phone = Some(phone.to_string());
        }
    }

    /// An identifier that came to this customer without them presenting it moved to the
    /// customer who did (`identifier` as `email:ann@example.com`, normalized as this
    /// profile's addresses are): the e-mail or phone it names is not this customer's
    /// address. Returns whether it was.
    pub fn release_identifier(&mut self, identifier: &str, holder: &str) -> bool {
        let Some((kind, value)) = identifier.split_once(':') else {
            return false;
        };
        let moved = |address: &str| same_contact(address, value);
        let Some(held) = self.drop_address(kind, moved, ConsentWithAddress::Withdrawn) else {
            return false;
        };
        let moved = ReleasedAddress {
            identifier: identifier.to_string(),
            holder: holder.to_string(),
        };
        note_released(&mut self.released_addresses, moved);
        held
    }

    /// Drops the `kind` (`email`, `phone`) address if `moved` says it moved away, with
    /// its statement's time: not the customer's statement, it must not read as a
    /// clearing of the field later (a merge with the address's holder would not bring
    /// it back). Whether it dropped it; `None` for a kind that is no address.
    ///
    /// A consent to the channel stated with the address or after it (the wife ticking
    /// the newsletter box as she typed her e-mail on the husband's laptop) is taken as
    /// its holder's, not this customer's: it is withdrawn as of its time, so it gives
    /// no consent to the next address the customer states, and no earlier statement
    /// read late brings one back. One stated before the address stays the customer's.
    fn drop_address(
        &mut self,
        kind: &str,
        moved: impl Fn(&str) -> bool,
        consent: ConsentWithAddress,
    ) -> Option<bool> {
        let (address, code, channel) = match kind {
            "email" => (&mut self.email, field::EMAIL, Channel::email),
            "phone" => (&mut self.phone, field::PHONE, Channel::sms),
            _ => return None,
        };
        // Replaced since by an address of the customer's own, it stays.
        let dropped = address.as_deref().is_some_and(moved);
        if dropped {
            *address = None;
            let stated_at = self.stated_at.remove(&code);
            // No time (a till receipt's phone): any consent may have been said of it.
            let held_since = (self.address_since.remove(&code))
                .or(stated_at)
                .unwrap_or(Millis::MIN);
            let consent_at = self.consent_at.get(&channel).copied();
            if consent_at.is_some_and(|at| at >= held_since) {
                match consent {
                    ConsentWithAddress::Withdrawn => {
                        self.consents.insert(channel, false);
                    }
                    ConsentWithAddress::Forgotten => {
                        self.consents.remove(&channel);
                        self.consent_at.remove(&channel);
                    }
                }
            }
        }
        Some(dropped)
    }

    /// Before a merge: an address moved away from this customer to someone other than
    /// the merged customer `other` (its move read before the merge that brings it back)
    /// is taken off `other`, before consents are weighed by whose address is kept; one
    /// moved to `other` is this customer's again (they are one now). The moves `other`
    /// noted join this customer's, but those to this customer.
    fn take_released_addresses(&mut self, other: &mut CustomerProfile) {
        // The merged customer is also whom it had absorbed.
        let theirs =
            |holder: &String| *holder == other.customer_id || other.merged_from.contains(holder);
        self.released_addresses
            .retain(|moved| !theirs(&moved.holder));
        for kind in ["email", "phone"] {
            let moved = |address: &str| {
                self.released_addresses.iter().any(|moved| {
                    moved
                        .identifier
                        .split_once(':')
                        .is_some_and(|(k, released)| k == kind && same_contact(released, address))
                })
            };
            other.drop_address(kind, moved, ConsentWithAddress::Forgotten);
        }
        for moved in std::mem::take(&mut other.released_addresses) {
            if moved.holder != self.customer_id {
                note_released(&mut self.released_addresses, moved);
            }
        }
    }

    /// Clears `attribute` as stated at `at`, unless a later statement of it is known.
    fn clear(&mut self, attribute: ProfileField, at: Millis) {
        let (code, slot) = match attribute {
            ProfileField::first_name => (field::FIRST_NAME, &mut self.first_name),
            ProfileField::last_name => (field::LAST_NAME, &mut self.last_name),
            ProfileField::birthday => (field::BIRTHDAY, &mut self.birthday),
            ProfileField::time_zone => (field::TIME_ZONE, &mut self.time_zone),
            ProfileField::email => (field::EMAIL, &mut self.email),
            ProfileField::phone => (field::PHONE, &mut self.phone),
            ProfileField::push_token => (field::PUSH_TOKEN, &mut self.push_token),
            ProfileField::messenger_id => (field::MESSENGER_ID, &mut self.messenger_id),
            ProfileField::subscription_ends_at => {
                if newer_statement(&mut self.stated_at, field::SUBSCRIPTION_ENDS_AT, at) {
                    self.subscription_ends_at = None;
                }
                return;
            }
        };
        if newer_statement(&mut self.stated_at, code, at) {
            *slot = None;
            self.address_since.remove(&code);
        }
    }

    pub fn update_cart(&mut self, e: &CustomerEvent) {
        let items: Vec<LineItem> = if e.items.is_empty() {
            e.product
                .iter()
                .map(|p| LineItem {
                    product_id: p.product_id.clone(),
                    name: p.name.clone(),
                    category: p.category.clone(),
                    quantity: 1,
                    unit_price: p.price.unwrap_or(0.0),
                })
                .collect()
        } else {
            e.items.clone()
        };
        let at = e.occurred_at;
        for mut item in items {
            let existing = self
                .cart
                .iter()
                .position(|c| c.product_id == item.product_id);
            match e.event_type {
                EventType::add_to_cart => {
                    item.quantity -= self.cancel_against_pending_removals(&item, at);
                    match existing {
                        _ if item.quantity <= 0 => {}
                        Some(i) => {
                            let held = &mut self.cart[i].quantity;
                            *held = held.saturating_add(item.quantity);
                        }
                        None => {
                            // A bot adding thousands of products must not grow the
                            // profile and every cart trigger without bound: the
                            // earliest additions go first.
                            if self.cart.len() >= MAX_CART_ITEMS {
                                self.cart.remove(0);
                            }
                            self.cart.push(item);
                        }
                    }
                }
                EventType::remove_from_cart => {
                    let held = existing.map_or(0, |i| self.cart[i].quantity);
                    if let Some(i) = existing {
                        self.cart[i].quantity -= item.quantity;
                        if self.cart[i].quantity <= 0 {
                            self.cart.remove(i);
                        }
                    }
                    if item.quantity > held {
                        self.pending_cart_removals.push(PendingCartRemoval {
                            product_id: item.product_id.as_str().into(),
                            quantity: item.quantity - held.max(0),
                            at,
                        });
                    }
                }
                _ => {}
            }
        }
        // The latest change, whatever order the devices' topics arrived in.
        let latest = self.cart_updated_at.map_or(at, |c| c.max(at));
        self.cart_updated_at = Some(latest);
        self.pending_cart_removals
            .retain(|r| r.at + PENDING_CART_REMOVAL_WINDOW >= latest);
        let excess = self
            .pending_cart_removals
            .len()
            .saturating_sub(MAX_PENDING_CART_REMOVALS);
        self.pending_cart_removals.drain(..excess);
    }

    /// Takes an addition made at `at` out of the removals of its product made after it
    /// that arrived first; returns how many of it they cancel.
    fn cancel_against_pending_removals(&mut self, item: &LineItem, at: Millis) -> i32 {
        let mut cancelled = 0;
        for removal in self.pending_cart_removals.iter_mut() {
            if removal.product_id == item.product_id && removal.at >= at {
                let take = removal.quantity.min(item.quantity - cancelled);
                removal.quantity -= take;
                cancelled += take;
            }
        }
        self.pending_cart_removals.retain(|r| r.quantity > 0);
        cancelled
    }

    /// Returns true if the catalog join should hear of this view: the product was not
    /// among the recently viewed ones, or it was last reported on an earlier day (UTC).
    /// The join keeps views by day for [`crate::catalog::VIEW_INTEREST_DAYS`], so it
    /// knows the customer's last day of viewing, at the cost of one record per product
    /// and day viewed. A view older than the one held (read late from another device's
    /// topic) changes nothing: the entry keeps the latest view and the price seen then.
    pub fn view(&mut self, p: &Product, at: Millis) -> bool {
        let day = at.div_euclid(kairos_core::time::DAY);
        let held = self
            .recently_viewed
            .iter()
            .find(|v| v.product_id == p.product_id);
        if held.is_some_and(|v| v.at > at) {
            return false;
        }
        let reported = held
            .and_then(|v| v.reported_at)
            .filter(|r| r.div_euclid(kairos_core::time::DAY) == day);
        if let Some(mark) = self
            .product_marks
            .iter_mut()
            .find(|m| m.product_id == p.product_id)
        {
            mark.viewed_at = mark.viewed_at.max(Some(at));
        }
        self.recently_viewed
            .retain(|v| v.product_id != p.product_id);
        self.recently_viewed.push(ViewedProduct {
            product_id: p.product_id.as_str().into(),
            name: p.name.as_deref().map(CompactString::from),
            category: p.category.as_deref().map(CompactString::from),
            price: p.price,
            at,
            reported_at: Some(reported.unwrap_or(at)),
        });
        if self.recently_viewed.len() > RECENTLY_VIEWED {
            self.recently_viewed.remove(0);
        }
        if let Some(c) = &p.category {
            self.recent_categories.retain(|x| x != c);
            self.recent_categories.push(c.as_str().into());
            if self.recent_categories.len() > RECENT_CATEGORIES {
                self.recent_categories.remove(0);
            }
        }
        reported.is_none()
    }

    /// The mark of `product_id`, added if missing (the caller sets a time on it, then
    /// calls [`Self::trim_product_marks`]).
    fn product_mark(&mut self, product_id: &str) -> &mut ProductMark {
        let index = match self
            .product_marks
            .iter()
            .position(|m| m.product_id == product_id)
        {
            Some(index) => index,
            None => {
                self.product_marks.push(ProductMark {
                    product_id: product_id.into(),
                    ..Default::default()
                });
                self.product_marks.len() - 1
            }
        };
        &mut self.product_marks[index]
    }

    /// Drops marks beyond the bound (see [`PRODUCT_MARKS`]): a wish's mark stays with
    /// the wish, so that a removal older than it cannot take it off; a removal's
    /// outlasts the purchases', so that a 40-line order does not let a wish taken off
    /// come back when its addition is read late.
    fn trim_product_marks(&mut self) {
        let wished = |m: &ProductMark| self.wishlist.iter().any(|w| w.product_id == m.product_id);
        let mut loose: Vec<usize> = (0..self.product_marks.len())
            .filter(|i| !wished(&self.product_marks[*i]))
            .collect();
        let excess = loose.len().saturating_sub(PRODUCT_MARKS);
        if excess == 0 {
            return;
        }
        // A mark that only holds a drop told leaves before one of a purchase or a
        // removal, which keeps a drop from a customer who bought or took it off.
        loose.sort_by_key(|i| {
            let m = &self.product_marks[*i];
            let holds_more = (m.bought_at.or(m.wished_at).or(m.unwished_at))
                .or(m.viewed_at)
                .is_some();
            (holds_more, m.unwished_at.is_some(), m.latest())
        });
        let mut leaving = loose[..excess].to_vec();
        leaving.sort_unstable();
        for i in leaving.into_iter().rev() {
            self.product_marks.remove(i);
        }
    }

    /// Adds a wish made at `at`; `None` when it was there already, or taken off at
    /// or after `at` (a removal read first). A full wishlist pushes its oldest wish
    /// out, which the caller must tell the catalog join about, or the join would keep
    /// sending that product's price drops.
    pub fn wishlist_add(&mut self, p: &Product, at: Millis) -> Option<WishlistAdded> {
        let mark = self.product_mark(&p.product_id);
        let taken_off_since = mark.unwished_at.is_some_and(|removed| removed >= at);
        if !taken_off_since {
            mark.wished_at = mark.wished_at.max(Some(at));
        }
        let listed = self.wishlist.iter().any(|w| w.product_id == p.product_id);
        let added = (!taken_off_since && !listed).then(|| {
            self.wishlist.push(p.clone());
            let pushed_out = (self.wishlist.len() > WISHLIST).then(|| self.wishlist.remove(0));
            WishlistAdded { pushed_out }
        });
        // After the list changed: a listed wish's mark is kept.
        self.trim_product_marks();
        added
    }

    /// Takes a wish off, as of `at`; true if it was on the list. The removal is
    /// remembered even for a product not on it (its addition may be read later), and
    /// changes nothing when the product was wished again after `at`.
    pub fn wishlist_remove(&mut self, product_id: &str, at: Millis) -> bool {
        let mark = self.product_mark(product_id);
        let wished_since = mark.wished_at.is_some_and(|wished| wished > at);
        if !wished_since {
            mark.unwished_at = mark.unwished_at.max(Some(at));
        }
        let before = self.wishlist.len();
        if !wished_since {
            self.wishlist.retain(|w| w.product_id != product_id);
        }
        self.trim_product_marks();
        before != self.wishlist.len()
    }

    /// Notes that the customer bought these products at `at`, in `order_id`.
    pub fn note_bought<'a>(
        &mut self,
        product_ids: impl IntoIterator<Item = &'a str>,
        at: Millis,
        order_id: Option<&str>,
    ) {
        for product_id in product_ids {
            let mark = self.product_mark(product_id);
            if mark.bought_at.is_none_or(|bought| bought <= at) {
                mark.bought_at = Some(at);
                mark.bought_in = order_id.map(str::to_string);
            }
        }
        self.trim_product_marks();
    }

    /// A cancelled order bought nothing: its products are wanted as before.
    fn forget_bought_in(&mut self, order_id: &str) {
        for mark in self.product_marks.iter_mut() {
            if mark.bought_in.as_deref() == Some(order_id) {
                mark.bought_at = None;
                mark.bought_in = None;
            }
        }
    }

    /// Whether a price drop (`wishes_only` false) or a return to stock (true) of
    /// `product_id` at `changed_at` is news to the customer. The catalog join sends it
    /// to whoever viewed the product within its window or wished it; the profile knows
    /// more: what they bought, took off the wishlist or saw after the change. A
    /// purchase counts when it is at or after their latest view or wish of the product;
    /// when neither time is known any more (the view left the latest twenty), when it
    /// falls within the join's window.
    pub fn product_appeal(
        &self,
        product_id: &str,
        wishes_only: bool,
        changed_at: Millis,
    ) -> ProductAppeal {
        let mark = self
            .product_marks
            .iter()
            .find(|m| m.product_id == product_id);
        let wish = self.wishlist.iter().find(|w| w.product_id == product_id);
        let wished_at = wish.and(mark.and_then(|m| m.wished_at));
        if wishes_only && wish.is_none() {
            return ProductAppeal::NotWished;
        }
        // Wished after the change (the catalog's update read late): in stock, or at the
        // new price, when they wished it.
        if wished_at.is_some_and(|w| w > changed_at) {
            return ProductAppeal::SeenSince;
        }
        let view = self
            .recently_viewed
            .iter()
            .find(|v| v.product_id == product_id)
            .filter(|_| !wishes_only);
        let viewed_at = match wishes_only {
            true => None,
            false => view.map(|v| v.at).max(mark.and_then(|m| m.viewed_at)),
        };
        if !wishes_only {
            if viewed_at.is_some_and(|v| v > changed_at) {
                return ProductAppeal::SeenSince;
            }
            let unwished_at = mark.and_then(|m| m.unwished_at);
            let removed_after_view =
                unwished_at.is_some_and(|removed| viewed_at.is_none_or(|v| removed >= v));
            if wish.is_none() && removed_after_view {
                return ProductAppeal::Unwished;
            }
        }
        // The join's window, when the start of the interest is not known.
        let window_start = changed_at - crate::catalog::VIEW_INTEREST_DAYS * kairos_core::time::DAY;
        if !wishes_only && wish.is_none() && viewed_at.is_some_and(|v| v < window_start) {
            return ProductAppeal::ViewedLongAgo;
        }
        // A purchase before a later view or wish leaves them wanting it (another one).
        let interest_since = viewed_at.max(wished_at);
        let bought_at = mark.and_then(|m| m.bought_at);
        if bought_at.is_some_and(|b| b >= interest_since.unwrap_or(window_start)) {
            return ProductAppeal::Bought;
        }
        // The later of the view and the wish is the price last seen (a view's price
        // only while its entry is the latest view).
        // A price of 0 ("price on request") is none, as for the catalog.
        let view_price = view
            .filter(|v| Some(v.at) == viewed_at)
            .and_then(|v| v.price)
            .filter(|p| *p > 0.0);
        let wish_price = wish.and_then(|w| w.price).filter(|p| *p > 0.0);
        let price_seen = match (viewed_at, wished_at) {
            (Some(v), Some(w)) if w > v => wish_price.or(view_price),
            (None, _) => wish_price,
            _ => view_price.or(wish_price),
        };
        // A drop told since they last saw the product is a price they know.
        let told = mark
            .and_then(|m| Some((m.told_at?, m.told_price?, m.told_up_to_percent)))
            .filter(|(at, _, _)| interest_since.is_none_or(|seen| *at >= seen))
            .map(|(_, price, up_to)| Told {
                price,
                up_to_percent: up_to.unwrap_or(0.0),
            });
        ProductAppeal::Wanted { price_seen, told }
    }

    /// Notes that the customer was sent a trigger for a drop of `product_id` to
    /// `price` at `at` (the catalog change's time); an older one read later changes
    /// nothing.
    pub fn note_told_price(&mut self, product_id: &str, price: f64, at: Millis, up_to: f64) {
        let mark = self.product_mark(product_id);
        if mark.told_at.is_none_or(|told| told <= at) {
            mark.told_at = Some(at);
            mark.told_price = Some(price);
            mark.told_up_to_percent = Some(up_to);
        }
        self.trim_product_marks();
    }

    /// Sets `channel`'s consent as stated at `at`, unless a later statement is known
    /// (topics are consumed independently, so statements arrive out of order). Returns
    /// whether it was applied.
    pub fn state_consent(&mut self, channel: Channel, granted: bool, at: Millis) -> bool {
        let known = self.consent_at.get(&channel).copied();
        let withdrawn = self.consents.get(&channel) == Some(&false);
        // At the same time, a withdrawal wins (as in the arbiter).
        if known.is_some_and(|k| k > at || (k == at && granted && withdrawn)) {
            return false;
        }
        self.consents.insert(channel, granted);
        self.consent_at.insert(channel, at);
        true
    }

    /// Counts a purchase; false (and nothing counted) for an order counted already (a
    /// producer's retry under a new event id, a till receipt uploaded twice). An online
    /// purchase empties the cart (the cart is what was bought, whatever the device's
    /// clock says); a till sale older than the cart's last change leaves it alone: the
    /// items were added after it.
    pub fn record_purchase(
        &mut self,
        at: Millis,
        total: f64,
        offline: bool,
        order_id: Option<String>,
    ) -> PurchaseApplied {
        let mut came_first = Vec::new();
        if let Some(id) = &order_id {
            // A till receipt and a web order may share a number: each is its own order.
            if self.order_index(id, offline).is_some() {
                return PurchaseApplied::AlreadyCounted;
            }
            let (theirs, rest) = std::mem::take(&mut self.early_reversals)
                .into_iter()
                .partition(|r| r.order_id == *id);
            (came_first, self.early_reversals) = (theirs, rest);
            if self.recent_orders.len() >= RECENT_ORDERS {
                self.recent_orders.remove(0);
            }
            self.recent_orders.push(OrderRecord {
                order_id: id.clone(),
                total,
                at,
                reversed: false,
                offline,
                ..Default::default()
            });
        }
        let taken: f64 = came_first.iter().map(|r| r.revenue_taken).sum();
        if let Some(order) = self
            .recent_orders
            .last_mut()
            .filter(|_| !came_first.is_empty())
        {
            order.note_reversals(came_first.iter());
        }
        let empties_cart = !offline || self.cart_updated_at.is_none_or(|changed| changed <= at);
        if came_first.iter().any(|r| r.cancelled) {
            // Nothing of it counts: what the cancellation took from the revenue
            // (taken for an old order) comes back. The checkout still happened: the
            // cart empties as it would have with the purchase read first.
            self.revenue += taken;
            if let Some(order) = self.recent_orders.last_mut() {
                order.reversed = true;
                order.cancelled = true;
            }
            if empties_cart {
                self.cart.clear();
            }
            return PurchaseApplied::CancelledBefore;
        }
        self.orders += 1;
        if offline {
            self.offline_orders += 1;
        }
        if order_id.is_none() {
            self.last_unkeyed_purchase_at = self.last_unkeyed_purchase_at.max(Some(at));
        }
        self.revenue += total;
        self.pay_off_refunds(at, total);
        self.first_purchase_at = Some(self.first_purchase_at.map_or(at, |f| f.min(at)));
        if self.last_purchase_at.is_none_or(|last| at >= last) {
            self.last_purchase_at = Some(at);
            self.last_order_id = order_id;
        }
        if empties_cart {
            self.cart.clear();
        }
        if !came_first.is_empty() {
            // Returns that came first: the order counts, their amounts (the whole
            // order for one naming none) do not; what they took out already stays out.
            let returned = came_first
                .iter()
                .map(|r| r.amount.unwrap_or(total))
                .sum::<f64>()
                .min(total);
            self.revenue = (self.revenue - (returned - taken)).max(0.0);
            if let Some(order) = self.recent_orders.last_mut() {
                order.returned_amount = returned;
                order.reversed = returned >= total - 1e-9;
            }
        }
        PurchaseApplied::Counted
    }

    /// Takes a returned or cancelled order out of the revenue: `total` when the event
    /// says it, else the amount the order was counted with; a cancelled order stops
    /// counting as an order too. An order reversed before is not reversed again.
    /// Whether `address` bounced hard on `channel` (rows from before the list hold
    /// only the latest bounce).
    pub fn is_bounced(&self, channel: Channel, address: &str) -> bool {
        // Bounces stored before e-mail domains were normalized keep the Unicode form.
        let same = |a: &String| kairos_core::identifiers::same_address(a, address);
        self.hard_bounced.get(&channel).is_some_and(same)
            || self
                .bounced_addresses
                .get(&channel)
                .is_some_and(|list| list.iter().any(same))
    }

    /// Remembers a hard bounce of `address`, keeping the earlier bounced ones.
    fn note_bounced(&mut self, channel: Channel, address: String) {
        let list = self.bounced_addresses.entry(channel).or_default();
        if list.contains(&address) {
            return;
        }
        // A row from before the list: its one bounced address joins it.
        if let Some(earlier) = self.hard_bounced.get(&channel) {
            if !list.contains(earlier) {
                list.push(earlier.clone());
            }
        }
        list.push(address.clone());
        while list.len() > MAX_BOUNCED_ADDRESSES {
            list.remove(0);
        }
        self.hard_bounced.insert(channel, address);
    }

    /// Whether every order counted is among the recent ones (fewer than the bound were
    /// ever counted, as far as the list can tell).
    pub fn holds_every_order(&self) -> bool {
        // Every order counted is listed: none pushed out, none that named no order
        // id (and none counted by a version that kept no list).
        let listed = self.recent_orders.iter().filter(|o| !o.cancelled).count();
        self.recent_orders.len() < RECENT_ORDERS && listed >= self.orders as usize
    }

    /// The stages and segments the customer held before cancellations of `order_id`
    /// read ahead of its purchase (see [`EarlyReversal::held_before`]).
    pub fn held_before_early_cancellation(&self, order_id: Option<&str>) -> Vec<String> {
        let Some(order_id) = order_id else {
            return Vec::new();
        };
        self.early_reversals
            .iter()
            .filter(|r| r.cancelled && r.order_id == order_id)
            .flat_map(|r| r.held_before.iter().cloned())
            .collect()
    }

    pub fn record_return(
        &mut self,
        order_id: &str,
        total: Option<f64>,
        at: Millis,
        kind: ReversalKind,
    ) -> Reversal {
        let known = self
            .order_named(order_id)
            .map(|n| &mut self.recent_orders[n]);
        let (amount, known, offline, cancelled_at) = match known {
            Some(order) if order.reversed => return Reversal::AlreadyReversed,
            Some(order) => {
                if kind == ReversalKind::Return {
                    // The same part at the same time, re-sent: applied already.
                    let part = return_part_key(at, total);
                    if order.returned_parts.contains(&part) {
                        return Reversal::AlreadyReversed;
                    }
                    if order.returned_parts.len() >= MAX_RETURNED_PARTS {
                        order.returned_parts.remove(0);
                    }
                    order.returned_parts.push(part);
                }
                // Never more than what still counts of the order.
                let left = (order.total - order.returned_amount).max(0.0);
                let amount = total.map_or(left, |t| t.min(left));
                order.returned_amount += amount;
                // A return of part of the order leaves the rest counted; another
                // part may follow.
                let whole = kind == ReversalKind::Cancellation
                    || order.returned_amount >= order.total - 1e-9;
                order.reversed = whole;
                order.cancelled = kind == ReversalKind::Cancellation;
                let cancelled_at = order.cancelled.then_some(order.at);
                (amount, true, order.offline, cancelled_at)
            }
            None => {
                // The same reversal re-sent (a new event id, the same time and amount).
                let cancelled = kind == ReversalKind::Cancellation;
                if self.early_reversals.iter().any(|r| {
                    r.order_id == order_id
                        && r.cancelled == cancelled
                        && r.at == at
                        && r.amount == total
                }) {
                    return Reversal::AlreadyReversed;
                }
                // While the profile holds every order it counted, an unknown one was
                // never counted here (its purchase is on its way, or never comes):
                // nothing to take out. Otherwise it may be an older one.
                let counted = if self.holds_every_order() {
                    0.0
                } else {
                    total.unwrap_or(0.0)
                };
                (counted, false, false, None)
            }
        };
        match kind {
            ReversalKind::Return => self.returns += 1,
            ReversalKind::Cancellation if known => {
                self.orders = self.orders.saturating_sub(1);
                if offline {
                    self.offline_orders = self.offline_orders.saturating_sub(1);
                }
            }
            // An order not among the recent ones may never have been counted here.
            ReversalKind::Cancellation => {}
        }
        let before = self.revenue;
        self.revenue = (self.revenue - amount).max(0.0);
        if !known {
            if self.early_reversals.len() >= MAX_EARLY_REVERSALS {
                self.early_reversals.remove(0);
            }
            let held_before = (self.lifecycle.iter())
                .chain(self.rfm.as_ref().map(|r| &r.segment))
                .cloned()
                .collect();
            self.early_reversals.push(EarlyReversal {
                order_id: order_id.to_string(),
                cancelled: kind == ReversalKind::Cancellation,
                amount: total,
                revenue_taken: before - self.revenue,
                at,
                held_before,
            });
        }
        if let Some(at) = cancelled_at {
            self.forget_purchase_time(at);
        }
        if kind == ReversalKind::Cancellation {
            self.forget_bought_in(order_id);
        }
        Reversal::Applied { known }
    }

    /// A cancelled order bought nothing: when it was the last (or first) purchase, the
    /// recency (and the first purchase) come from the orders that still count. Left
    /// alone when those are not known (older orders than the recent ones counted).
    fn forget_purchase_time(&mut self, at: Millis) {
        let counted = || self.recent_orders.iter().filter(|o| !o.cancelled);
        if self.last_purchase_at == Some(at) {
            let unkeyed = self.last_unkeyed_purchase_at.map(|at| (at, None));
            let latest = counted()
                .max_by_key(|o| o.at)
                .map(|o| (o.at, Some(o.order_id.clone())))
                .into_iter()
                .chain(unkeyed)
                .max_by_key(|(at, _)| *at);
            match latest {
                Some((latest_at, order_id)) => {
                    self.last_purchase_at = Some(latest_at);
                    self.last_order_id = order_id;
                }
                None if self.orders == 0 => {
                    self.last_purchase_at = None;
                    self.last_order_id = None;
                }
                None => {}
            }
        }
        if self.first_purchase_at == Some(at) {
            if self.orders == 0 {
                self.first_purchase_at = None;
            } else if counted().count() >= self.orders as usize {
                self.first_purchase_at = counted().map(|o| o.at).min();
            }
        }
    }

    /// The recent order an order status or a reversal naming `order_id` is about: the
    /// web order of that id, else a till sale of it (a till receipt and a web order
    /// may share a number).
    fn order_named(&self, order_id: &str) -> Option<usize> {
        (self.order_index(order_id, false)).or_else(|| self.order_index(order_id, true))
    }

    /// The recent web order (or till sale, `offline`) `order_id`: a till receipt and a
    /// web order may share a number, and are two orders.
    fn order_index(&self, order_id: &str, offline: bool) -> Option<usize> {
        (self.recent_orders.iter()).position(|o| o.order_id == order_id && o.offline == offline)
    }

    /// Whether the order is known to be partly returned (and not all of it).
    pub fn partly_returned(&self, order_id: &str) -> bool {
        self.recent_orders
            .iter()
            .any(|o| o.order_id == order_id && !o.reversed && o.returned_amount > 0.0)
    }

    /// Whether the order is known to be returned (all or part of it) or cancelled: no
    /// review request, no NPS survey for it.
    pub fn order_returned(&self, order_id: &str) -> bool {
        self.recent_orders
            .iter()
            .any(|o| o.order_id == order_id && (o.reversed || o.returned_amount > 0.0))
            || self.early_reversals.iter().any(|r| r.order_id == order_id)
    }

    /// A till refund (it names no original receipt): its own amount leaves the
    /// revenue, once per refund receipt. What the revenue cannot cover waits for a
    /// sale dated before the refund (see `refund_shortfalls`).
    pub fn record_refund(&mut self, refund_receipt_id: &str, total: f64, at: Millis) -> Reversal {
        if self.recent_refunds.iter().any(|r| r == refund_receipt_id) {
            return Reversal::AlreadyReversed;
        }
        if self.recent_refunds.len() >= RECENT_ORDERS {
            self.recent_refunds.remove(0);
        }
        self.recent_refunds.push(refund_receipt_id.to_string());
        self.returns += 1;
        let taken = total.min(self.revenue).max(0.0);
        self.revenue -= taken;
        if total - taken > 1e-9 {
            if self.refund_shortfalls.len() >= MAX_EARLY_REVERSALS {
                self.refund_shortfalls.remove(0);
            }
            self.refund_shortfalls.push((at, total - taken));
        }
        Reversal::Applied { known: false }
    }

    /// A sale of `amount` at `sale_at` was just counted: refunds dated after it whose
    /// amount the revenue could not cover take it now, oldest first, up to the sale's
    /// amount (sales after the refund are no part of what it refunded).
    fn pay_off_refunds(&mut self, sale_at: Millis, amount: f64) {
        let mut left = amount.min(self.revenue).max(0.0);
        for (refund_at, short) in &mut self.refund_shortfalls {
            if *refund_at >= sale_at {
                let paid = short.min(left);
                left -= paid;
                self.revenue -= paid;
                *short -= paid;
            }
        }
        self.refund_shortfalls.retain(|(_, short)| *short > 1e-9);
    }

    /// Notes that the order reached `status`: whether for the first time, or None when
    /// the order is not among the recent ones.
    pub fn note_status(&mut self, order_id: &str, status: OrderStatus, at: Millis) -> Option<bool> {
        let n = self.order_named(order_id)?;
        let order = &mut self.recent_orders[n];
        let bit = status_bit(status);
        let first = order.statuses & bit == 0;
        order.statuses |= bit;
        if first && status == OrderStatus::delivered {
            order.delivered_at = Some(at);
        }
        Some(first)
    }

    /// The latest order that still counts (not returned or cancelled).
    pub fn latest_order(&self) -> Option<&OrderRecord> {
        self.recent_orders
            .iter()
            .filter(|o| !o.reversed)
            .max_by_key(|o| o.at)
    }

    /// The order delivered last, with its delivery time, if it still counts.
    pub fn latest_delivery(&self) -> Option<(&OrderRecord, Millis)> {
        self.recent_orders
            .iter()
            .filter(|o| !o.reversed)
            .filter_map(|o| Some((o, o.delivered_at?)))
            .max_by_key(|(_, at)| *at)
    }

    /// Whether the order is known to be returned or cancelled.
    pub fn order_reversed(&self, order_id: &str) -> bool {
        self.recent_orders
            .iter()
            .any(|o| o.order_id == order_id && o.reversed)
    }

    /// Average order value: revenue (net of returns) over orders.
    pub fn average_order_value(&self) -> Option<f64> {
        (self.orders > 0).then(|| self.revenue / f64::from(self.orders))
    }

    pub fn bought_since(&self, at: Millis) -> bool {
        self.last_purchase_at.is_some_and(|p| p >= at)
    }

    pub fn cart_value(&self) -> f64 {
        self.cart
            .iter()
            .map(|i| i.unit_price * f64::from(i.quantity))
            .sum()
    }

    /// Variables every template may use, with the occasion's own `extra` ones.
    pub fn template_variables<'a>(
        &'a self,
        extra: &'a serde_json::Map<String, serde_json::Value>,
    ) -> TemplateVariables<'a> {
        TemplateVariables {
            profile: self,
            extra,
        }
    }
}

/// A trigger's template variables: the profile's (customer id, first name, cart items
/// and value, orders, segment, lifecycle stage) and the occasion's `extra` ones, which
/// win over a profile variable of the same name. Serialized straight from the profile,
/// as one JSON object with its keys in order and cart items with theirs: byte for byte
/// what building a `serde_json::Map` first wrote, without the map (a fortieth of the
/// profile replay).
pub struct TemplateVariables<'a> {
    profile: &'a CustomerProfile,
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

/// One template variable: the profile's own, or one the occasion brought.
enum Variable<'a> {
    Text(Option<&'a str>),
    Cart(&'a [LineItem]),
    Number(f64),
    Count(u32),
    Extra(&'a serde_json::Value),
}

/// A cart item with its keys in alphabetical order, as in a JSON map.
struct CartItem<'a>(&'a LineItem);

impl Serialize for CartItem<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("category", &self.0.category)?;
        map.serialize_entry("name", &self.0.name)?;
        map.serialize_entry("product_id", &self.0.product_id)?;
        map.serialize_entry("quantity", &self.0.quantity)?;
        map.serialize_entry("unit_price", &self.0.unit_price)?;
        map.end()
    }
}

impl Serialize for Variable<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Variable::Text(text) => text.serialize(serializer),
            Variable::Number(n) => n.serialize(serializer),
            Variable::Count(n) => n.serialize(serializer),
            Variable::Cart(items) => serializer.collect_seq(items.iter().map(CartItem)),
            Variable::Extra(value) => value.serialize(serializer),
        }
    }
}

impl Serialize for TemplateVariables<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.profile;
        let own = [
            (
                "average_order_value",
                p.average_order_value().map_or(Variable::Text(None), |v| {
                    Variable::Number((v * 100.0).round() / 100.0)
                }),
            ),
            ("cart_items", Variable::Cart(&p.cart)),
            (
                "cart_value",
                Variable::Number((p.cart_value() * 100.0).round() / 100.0),
            ),
            ("customer_id", Variable::Text(Some(&p.customer_id))),
            ("first_name", Variable::Text(p.first_name.as_deref())),
            ("lifecycle", Variable::Text(p.lifecycle.as_deref())),
            ("orders", Variable::Count(p.orders)),
            (
                "segment",
                Variable::Text(p.rfm.as_ref().map(|r| r.segment.as_str())),
            ),
        ];
        // The occasion's variables win; all of them in alphabetical order of names.
        let mut all: Vec<(&str, Variable<'_>)> = own
            .into_iter()
            .filter(|(name, _)| !self.extra.contains_key(*name))
            .chain(
                self.extra
                    .iter()
                    .map(|(name, value)| (name.as_str(), Variable::Extra(value))),
            )
            .collect();
        all.sort_unstable_by_key(|(name, _)| *name);
        serializer.collect_map(all)
    }
}

/// Events that count as a visit (the customer was on the site or in the app).
pub fn is_visit(t: EventType) -> bool {
    !matches!(
        t,
        EventType::heartbeat | EventType::order_status | EventType::consent_change
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_core::encoding::{decode_state, encode_state};
    use kairos_core::time::{DAY, HOUR};

    /// Drops told of products only viewed leave the bounded marks before a purchase's:
    /// a sale's forty drops do not make the profile forget what the customer bought.
    #[test]
    fn drops_told_leave_the_marks_before_a_purchase() {
        let mut p = CustomerProfile::new("c", 0);
        p.note_bought(["bought"], HOUR, Some("o1"));
        for i in 0..40 {
            let product = format!("told-{i}");
            p.note_told_price(&product, 10.0, 2 * HOUR + i, 10.0);
        }
        assert_eq!(p.product_marks.len(), PRODUCT_MARKS);
        assert_eq!(
            p.product_appeal("bought", false, 3 * HOUR),
            ProductAppeal::Bought
        );
    }

    /// A merge brings back no address moved away from the survivor to someone else (its
    /// move read first), but does bring one moved to the merged customer: they are one
    /// person now.
    #[test]
    fn a_merge_brings_back_a_moved_address_only_from_the_customer_it_moved_to() {
        let with_email = |id: &str, email: &str| {
            let mut p = CustomerProfile::new(id, 0);
            p.email = Some(email.into());
            p.stated_at.insert(field::EMAIL, 10);
            p
        };
        // The husband's statement (the wife typing on his laptop) is later than hers.
        let mut husband = with_email("c-h", "wife@example.com");
        husband.stated_at.insert(field::EMAIL, 20);
        // Moved first to another account of hers, then on to c-w: noted once.
        assert!(husband.release_identifier("email:wife@example.com", "c-old"));
        husband.email = Some("wife@example.com".into());
        assert!(husband.release_identifier("email:wife@example.com", "c-w"));
        assert_eq!(husband.released_addresses.len(), 1);
        husband.absorb(with_email("anon:tablet", "wife@example.com"));
        assert_eq!(husband.email, None, "not from the tablet's profile");
        husband.absorb(with_email("c-w", "wife@example.com"));
        assert_eq!(
            husband.email.as_deref(),
            Some("wife@example.com"),
            "from its holder"
        );
        assert!(husband.released_addresses.is_empty());
    }

    /// A moved identifier takes the address it names, and only that one: an address
    /// the customer stated since stays, and a card is no address.
    #[test]
    fn a_moved_identifier_releases_only_the_address_it_names() {
        let mut p = CustomerProfile::new("c-1", 0);
        p.email = Some("wife@example.com".into());
        p.phone = Some("+4915111112222".into());
        assert!(!p.release_identifier("email:husband@example.com", "c-w"));
        assert!(!p.release_identifier("loyalty_card:123", "c-w"));
        assert!(!p.release_identifier("phone:+4915111113333", "c-w"));
        assert_eq!(p.email.as_deref(), Some("wife@example.com"));
        assert_eq!(p.phone.as_deref(), Some("+4915111112222"));
        assert!(p.release_identifier("email:wife@example.com", "c-w"));
        assert_eq!(p.email, None);
        assert_eq!(p.phone.as_deref(), Some("+4915111112222"));
        assert!(p.release_identifier("phone:+4915111112222", "c-w"));
        assert_eq!(p.phone, None);
        assert!(!p.release_identifier("phone:+4915111112222", "c-w"), "once");
        // An e-mail stored in its Unicode spelling, before domains were normalized.
        p.email = Some("anna@Bücher.de".into());
        assert!(p.release_identifier("email:anna@xn--bcher-kva.de", "c-w"));
        assert_eq!(p.email, None);
    }

    /// A consent given with a moved address (or after it) goes with it; one the
    /// customer gave before stays theirs.
    #[test]
    fn a_consent_stated_with_a_moved_address_leaves_with_it() {
        let mut p = CustomerProfile::new("c-h", 0);
        assert!(p.state_consent(Channel::sms, true, 5));
        p.phone = Some("+4915111112222".into());
        p.stated_at.insert(field::PHONE, 10);
        // The wife's e-mail and her newsletter tick, on the husband's laptop.
        p.email = Some("wife@example.com".into());
        p.stated_at.insert(field::EMAIL, 20);
        assert!(p.state_consent(Channel::email, true, 20));
        assert!(p.release_identifier("email:wife@example.com", "c-w"));
        assert_eq!(p.consents.get(&Channel::email), Some(&false));
        assert!(
            !p.state_consent(Channel::email, true, 15),
            "an earlier opt-in read late does not bring it back"
        );
        assert!(p.state_consent(Channel::email, true, 30), "his own, later");
        // His SMS consent came before the phone: the phone's move leaves it.
        assert!(p.release_identifier("phone:+4915111112222", "c-w"));
        assert_eq!(p.consents.get(&Channel::sms), Some(&true));
        assert_eq!(p.consents.get(&Channel::email), Some(&true));
    }

    fn statement(email: &str, consent: Option<bool>, at: Millis) -> CustomerEvent {
        let mut event: CustomerEvent = serde_json::from_value(serde_json::json!({
            "event_id": format!("form-{at}"),
            "event_type": "consent_change",
            "occurred_at": "2000-01-01T00:00:00Z",
            "email": email,
            "consent": consent.map(|granted| serde_json::json!({"channel": "email", "granted": granted})),
        }))
        .expect("a form");
        event.occurred_at = at;
        event
    }

    /// The wife's opt-in came between two visits of hers that stated her e-mail on the
    /// tablet, read out of order, and her address came to the husband with the
    /// tablet's profile: it is hers from her first statement, so the opt-in leaves
    /// with it.
    #[test]
    fn an_address_is_held_since_its_first_statement_in_any_order_and_across_a_merge() {
        let mut tablet = CustomerProfile::new("anon:tablet", 0);
        tablet.touch(&statement("wife@example.com", None, 30), 100);
        tablet.touch(&statement("wife@example.com", None, 10), 100);
        tablet.touch(&statement("wife@example.com", Some(true), 20), 100);
        assert_eq!(tablet.address_since.get(&field::EMAIL), Some(&10));
        assert_eq!(tablet.stated_at.get(&field::EMAIL), Some(&30));
        let mut husband = CustomerProfile::new("c-h", 0);
        assert!(husband.state_consent(Channel::email, true, 5));
        husband.absorb(tablet);
        assert_eq!(husband.email.as_deref(), Some("wife@example.com"));
        assert_eq!(husband.address_since.get(&field::EMAIL), Some(&10));
        assert!(husband.release_identifier("email:wife@example.com", "c-w"));
        assert_eq!(husband.consents.get(&Channel::email), Some(&false));
        // His own address again: held since now, not since hers.
        husband.touch(&statement("husband@example.com", None, 40), 100);
        husband.touch(&statement("husband@example.com", None, 45), 100);
        assert_eq!(husband.address_since.get(&field::EMAIL), Some(&40));
        husband.touch(&statement("work@example.com", None, 50), 100);
        assert_eq!(husband.address_since.get(&field::EMAIL), Some(&50));
    }

    /// The tablet's profile, holding the wife's e-mail and her opt-in, merges into the
    /// husband after the e-mail moved to her: neither the address nor the opt-in
    /// comes with it.
    #[test]
    fn a_merge_takes_no_consent_given_with_an_address_that_moved_away() {
        let mut husband = CustomerProfile::new("c-h", 0);
        husband.release_identifier("email:wife@example.com", "c-w");
        // His own word, said of no address: hers, later, must not outweigh it.
        assert!(husband.state_consent(Channel::email, true, 30));
        let mut tablet = CustomerProfile::new("anon:tablet", 0);
        tablet.email = Some("wife@example.com".into());
        tablet.stated_at.insert(field::EMAIL, 40);
        assert!(tablet.state_consent(Channel::email, true, 40));
        husband.absorb(tablet);
        assert_eq!(husband.email, None);
        assert_eq!(husband.consents.get(&Channel::email), Some(&true));
        assert_eq!(husband.consent_at.get(&Channel::email), Some(&30));
    }

    /// Her address on both profiles of a merge, his since later: held since her first
    /// statement, on the tablet, so her opt-in there leaves with it.
    #[test]
    fn the_same_address_on_both_sides_of_a_merge_is_held_since_the_earlier() {
        let mut tablet = CustomerProfile::new("anon:tablet", 0);
        tablet.touch(&statement("wife@example.com", None, 10), 100);
        tablet.touch(&statement("wife@example.com", Some(true), 20), 100);
        let mut husband = CustomerProfile::new("c-h", 0);
        husband.touch(&statement("wife@example.com", None, 30), 100);
        husband.absorb(tablet);
        assert_eq!(husband.address_since.get(&field::EMAIL), Some(&10));
        assert!(husband.release_identifier("email:wife@example.com", "c-w"));
        assert_eq!(husband.consents.get(&Channel::email), Some(&false));
    }

    /// A device dated ahead of the processor's clock: the address is held since the
    /// time its opt-in counts from, so the opt-in still leaves with it.
    #[test]
    fn an_address_from_a_device_dated_ahead_is_held_since_the_clock_s_time() {
        let mut p = CustomerProfile::new("c-h", 0);
        p.touch(&statement("wife@example.com", Some(true), 500), 100);
        assert_eq!(p.consent_at.get(&Channel::email), Some(&100));
        assert_eq!(p.address_since.get(&field::EMAIL), Some(&100));
        assert!(p.release_identifier("email:wife@example.com", "c-w"));
        assert_eq!(p.consents.get(&Channel::email), Some(&false));
    }

    #[test]
    fn a_bounce_stored_with_a_unicode_domain_still_bars_its_ascii_spelling() {
        let mut p = CustomerProfile::new("c", 0);
        p.hard_bounced
            .insert(Channel::email, "anna@bücher.de".into());
        p.bounced_addresses
            .insert(Channel::sms, vec!["anna@bücher.de".into()]);
        assert!(p.is_bounced(Channel::email, "anna@xn--bcher-kva.de"));
        assert!(p.is_bounced(Channel::sms, "anna@xn--bcher-kva.de"));
        assert!(!p.is_bounced(Channel::email, "anna@buecher.de"));
    }

    /// A guest checkout counted order o-1 under the visitor's id, the shop's backend
    /// under the account's: merged, it is one order, once in the revenue, and a
    /// return either copy saw is kept.
    #[test]
    fn an_order_both_merged_profiles_counted_counts_once() {
        let bought = |id: &str| {
            let mut p = CustomerProfile::new(id, 0);
            p.record_purchase(10, 100.0, false, Some("o-1".into()));
            p
        };
        let mut account = bought("c");
        account.record_purchase(20, 50.0, true, Some("o-2".into()));
        account.absorb(bought("anon:k"));
        assert_eq!(
            (
                account.orders,
                account.offline_orders,
                account.revenue,
                account.recent_orders.len()
            ),
            (2, 1, 150.0, 2)
        );
        // Both bought o-1; `reversals` happen to the account's and the visitor's copies
        // (true: the account's), then the visitor is merged into the account.
        let merged = |reversals: &[(bool, Option<f64>, ReversalKind)]| {
            let (mut account, mut visitor) = (bought("c"), bought("anon:k"));
            for (account_s, amount, kind) in reversals {
                let copy = if *account_s {
                    &mut account
                } else {
                    &mut visitor
                };
                copy.record_return("o-1", *amount, 30, *kind);
            }
            account.absorb(visitor);
            account
        };
        let returned = |amount| (false, Some(amount), ReversalKind::Return);
        // The visitor's copy saw a return of 30 the account's did not.
        let account = merged(&[returned(30.0)]);
        assert_eq!(
            (account.orders, account.revenue, account.returns),
            (1, 70.0, 1)
        );
        // Both saw the same return: one return, taken once.
        let account = merged(&[(true, Some(30.0), ReversalKind::Return), returned(30.0)]);
        assert_eq!(
            (account.orders, account.revenue, account.returns),
            (1, 70.0, 1)
        );
        // The visitor's copy was cancelled: nothing of it counts.
        let account = merged(&[(false, None, ReversalKind::Cancellation)]);
        assert_eq!((account.orders, account.revenue), (0, 0.0));
        assert_eq!(
            (account.last_purchase_at, account.first_purchase_at),
            (None, None),
            "a cancelled order bought nothing"
        );
    }

    #[test]
    fn a_cancelled_latest_order_leaves_the_recency_to_a_purchase_that_named_no_order() {
        let mut p = CustomerProfile::new("c", 0);
        p.record_purchase(0, 10.0, false, Some("o-1".into()));
        p.record_purchase(50 * DAY, 10.0, false, None);
        p.record_purchase(60 * DAY, 10.0, false, Some("o-3".into()));
        p.record_return("o-3", None, 61 * DAY, ReversalKind::Cancellation);
        assert_eq!(p.last_purchase_at, Some(50 * DAY));
        assert_eq!(p.last_order_id, None);
        assert_eq!(p.orders, 2);
    }

    #[test]
    fn an_unknown_order_reversed_may_be_one_counted_but_not_listed() {
        // A purchase that named no order is counted, not listed: an unknown order's
        // cancellation may be it.
        let mut p = CustomerProfile::new("c", 0);
        p.record_purchase(0, 100.0, false, None);
        assert!(!p.holds_every_order());
        p.record_return("o-x", Some(30.0), 10, ReversalKind::Cancellation);
        assert_eq!(p.revenue, 70.0);
        // A profile stored by a version that kept no list of orders.
        let mut p = CustomerProfile {
            orders: 30,
            revenue: 3000.0,
            ..CustomerProfile::new("c", 0)
        };
        assert!(!p.holds_every_order());
        p.record_return("o-old", Some(100.0), 10, ReversalKind::Cancellation);
        assert_eq!(p.revenue, 2900.0);
    }

    #[test]
    fn a_till_receipt_and_a_web_order_of_one_number_are_two_orders() {
        let mut p = CustomerProfile::new("c", 0);
        let web = p.record_purchase(10, 100.0, false, Some("100234".into()));
        let till = p.record_purchase(20, 60.0, true, Some("100234".into()));
        assert_eq!(
            (web, till),
            (PurchaseApplied::Counted, PurchaseApplied::Counted)
        );
        assert_eq!((p.orders, p.offline_orders, p.revenue), (2, 1, 160.0));
        // Uploaded again, the receipt is a repeat.
        let again = p.record_purchase(20, 60.0, true, Some("100234".into()));
        assert_eq!(again, PurchaseApplied::AlreadyCounted);
        // An order status names the web order.
        p.record_return("100234", None, 30, ReversalKind::Cancellation);
        assert_eq!((p.orders, p.offline_orders, p.revenue), (1, 1, 60.0));
    }

    #[test]
    fn a_reversal_both_ids_took_before_their_merge_is_given_back_by_each() {
        let with_reversal = |id: &str, kind: ReversalKind, amount: f64| {
            // As many orders as a profile keeps: an unknown order may be an old one,
            // so a reversal of one takes its amount out at once.
            let mut p = CustomerProfile::new(id, 0);
            for n in 0..RECENT_ORDERS {
                p.record_purchase(10, 5.0, false, Some(format!("old-{id}-{n}")));
            }
            p.record_return("o-1", Some(amount), 20, kind);
            p
        };
        // The cancellation reached both ids, each taking 80 of its 100.
        let mut survivor = with_reversal("a", ReversalKind::Cancellation, 80.0);
        survivor.absorb(with_reversal("b", ReversalKind::Cancellation, 80.0));
        assert_eq!(survivor.revenue, 40.0);
        let applied = survivor.record_purchase(15, 80.0, false, Some("o-1".into()));
        assert_eq!(applied, PurchaseApplied::CancelledBefore);
        assert_eq!((survivor.orders, survivor.revenue), (40, 200.0));
        // The same with the purchase merged in as well: settled at the merge.
        let mut survivor = with_reversal("a", ReversalKind::Cancellation, 80.0);
        let mut other = with_reversal("b", ReversalKind::Cancellation, 80.0);
        other.record_purchase(15, 80.0, false, Some("o-1".into()));
        survivor.absorb(other);
        assert_eq!((survivor.orders, survivor.revenue), (40, 200.0));
        // A return of 30 that reached both ids: counted once, taken once.
        let mut survivor = with_reversal("a", ReversalKind::Return, 30.0);
        let mut other = with_reversal("b", ReversalKind::Return, 30.0);
        other.record_purchase(15, 80.0, false, Some("o-1".into()));
        survivor.absorb(other);
        assert_eq!(
            (survivor.orders, survivor.revenue, survivor.returns),
            (41, 250.0, 1)
        );
        // The same return with the purchase after the merge.
        let mut survivor = with_reversal("a", ReversalKind::Return, 30.0);
        survivor.absorb(with_reversal("b", ReversalKind::Return, 30.0));
        survivor.record_purchase(15, 80.0, false, Some("o-1".into()));
        assert_eq!(
            (survivor.orders, survivor.revenue, survivor.returns),
            (41, 250.0, 1)
        );
    }

    #[test]
    fn a_part_noted_on_an_order_with_its_parts_full_replaces_the_oldest() {
        let mut order = OrderRecord {
            returned_parts: (0..MAX_RETURNED_PARTS as u64).collect(),
            ..OrderRecord::default()
        };
        let r = EarlyReversal {
            order_id: "o".into(),
            amount: Some(5.0),
            at: 42,
            ..EarlyReversal::default()
        };
        order.note_reversals(std::iter::once(&r));
        assert_eq!(order.returned_parts.len(), MAX_RETURNED_PARTS);
        assert_eq!(order.returned_parts.first(), Some(&1));
        assert_eq!(
            order.returned_parts.last(),
            Some(&return_part_key(42, Some(5.0)))
        );
        assert_eq!(order.statuses, status_bit(OrderStatus::returned));
    }

    #[test]
    fn event_ids_of_the_last_day_are_kept_beyond_the_last_32() {
        const MINUTE: Millis = 60_000;
        const HOUR: Millis = 60 * MINUTE;
        const DAY: Millis = 24 * HOUR;
        // Each event processed as it happens, unless given a later clock.
        let mut p = CustomerProfile::new("c", 0);
        for i in 0..40 {
            assert!(p.remember_event(&format!("e{i}"), i * MINUTE));
        }
        assert_eq!(p.recent_event_ids.len(), 40);
        assert!(!p.remember_event("e0", 40 * MINUTE), "40 events later");
        // An event read later prunes by the clock: the day's ids stay.
        assert!(p.remember_event("late", 41 * MINUTE));
        assert!(!p.remember_event("e1", 42 * MINUTE));
        // Two days on, what is older than a day goes down to the last 32.
        assert!(p.remember_event("next", 2 * DAY));
        assert_eq!(p.recent_event_ids.len(), 32);
        assert!(!p.remember_event("e39", 2 * DAY));
        assert!(p.remember_event("e0", 2 * DAY), "forgotten");
        // An entry stored before the hour was packed (a full hash) still matches.
        p.recent_event_ids
            .push_back(kairos_core::ids::stable_hash("stored-before"));
        assert!(!p.remember_event("stored-before", 2 * DAY));
        // An id 23 hours old is kept beyond the last 32, though its hour number is 24
        // back (00:59 on one day, 00:00 the next).
        let mut q = CustomerProfile::new("q", 0);
        assert!(q.remember_event("edge", 59 * MINUTE));
        for i in 0..40 {
            let at = HOUR + i * MINUTE;
            assert!(q.remember_event(&format!("f{i}"), at));
        }
        assert!(q.remember_event("next-day", DAY));
        assert!(!q.remember_event("edge", DAY));
        // Ids stamped by an instance whose clock ran ahead into the next hour (the
        // partition moved here) count as recent, beyond the last 32.
        let mut r = CustomerProfile::new("r", 0);
        let ahead = HOUR + 5 * MINUTE;
        assert!(r.remember_event("from-ahead", ahead));
        for i in 0..40 {
            assert!(r.remember_event(&format!("g{i}"), HOUR - MINUTE));
        }
        assert!(!r.remember_event("from-ahead", HOUR - MINUTE));
        // A burst is bounded.
        for i in 0..600 {
            p.remember_event(&format!("burst{i}"), 2 * DAY + i);
        }
        assert_eq!(p.recent_event_ids.len(), MAX_EVENT_IDS);
    }

    #[test]
    fn after_a_merge_a_new_view_pushes_out_the_oldest_one() {
        let product = |id: &str| Product {
            product_id: id.into(),
            name: None,
            category: None,
            price: Some(1.0),
        };
        let mut mine = CustomerProfile::default();
        let mut theirs = CustomerProfile::default();
        for i in 1..=15 {
            mine.view(&product(&format!("m{i}")), i);
        }
        for i in 16..=25 {
            theirs.view(&product(&format!("t{i}")), i);
        }
        mine.absorb(theirs);
        let ids = |p: &CustomerProfile| -> Vec<String> {
            p.recently_viewed
                .iter()
                .map(|v| v.product_id.to_string())
                .collect()
        };
        assert_eq!(ids(&mine).len(), 20);
        assert_eq!(ids(&mine)[0], "m6", "the five oldest went");
        mine.view(&product("new"), 30);
        let after = ids(&mine);
        assert_eq!(after.first().map(String::as_str), Some("m7"), "{after:?}");
        assert_eq!(after.last().map(String::as_str), Some("new"));
        assert!(after.contains(&"t25".to_string()), "{after:?}");
    }

    /// What the variables were before they were serialized straight from the profile:
    /// a JSON map built from the profile, extended by the occasion's variables.
    fn variables_as_a_map(
        p: &CustomerProfile,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> String {
        let mut m = serde_json::Map::new();
        m.insert("customer_id".into(), p.customer_id.clone().into());
        m.insert("first_name".into(), p.first_name.clone().into());
        m.insert("cart_items".into(), serde_json::to_value(&p.cart).unwrap());
        m.insert(
            "cart_value".into(),
            ((p.cart_value() * 100.0).round() / 100.0).into(),
        );
        m.insert("orders".into(), p.orders.into());
        m.insert(
            "average_order_value".into(),
            p.average_order_value()
                .map(|v| (v * 100.0).round() / 100.0)
                .into(),
        );
        m.insert(
            "segment".into(),
            p.rfm.as_ref().map(|r| r.segment.clone()).into(),
        );
        m.insert("lifecycle".into(), p.lifecycle.clone().into());
        m.extend(extra.clone());
        serde_json::to_string(&m).unwrap()
    }

    #[test]
    fn template_variables_are_the_json_of_the_map_they_replace() {
        let mut p = CustomerProfile::new("c-\"1\"", 1);
        let none = serde_json::Map::new();
        // An empty profile: nulls, an empty cart, zero value.
        assert_eq!(
            serde_json::to_string(&p.template_variables(&none)).unwrap(),
            variables_as_a_map(&p, &none)
        );
        p.first_name = Some("Анна".into());
        p.lifecycle = Some("regular".into());
        p.orders = 3;
        p.rfm = Some(RfmScore {
            r: 5,
            f: 4,
            m: 3,
            segment: "Champions".into(),
        });
        p.cart = vec![
            LineItem {
                product_id: "p1".into(),
                name: Some("Shoes \"Run\"".into()),
                category: None,
                quantity: 2,
                unit_price: 59.9,
            },
            LineItem {
                product_id: "p2".into(),
                name: None,
                category: Some("bags".into()),
                quantity: 1,
                unit_price: 0.1,
            },
        ];
        // Occasion variables before, between and after the profile's, and one that
        // replaces the profile's own `segment`.
        let mut extra = serde_json::Map::new();
        extra.insert("a_first".into(), 1.into());
        extra.insert("from_segment".into(), serde_json::Value::Null);
        extra.insert("segment".into(), "At Risk".into());
        extra.insert("zz_last".into(), serde_json::json!({"k": [1.5, "x"]}));
        for extra in [&none, &extra] {
            let direct = serde_json::to_string(&p.template_variables(extra)).unwrap();
            assert_eq!(direct, variables_as_a_map(&p, extra));
            assert_eq!(
                sonic_rs::to_string(&p.template_variables(extra)).unwrap(),
                direct
            );
        }
        let json = serde_json::to_string(&p.template_variables(&extra)).unwrap();
        assert!(json.contains(r#""segment":"At Risk""#), "{json}");
        assert_eq!(json.matches("segment").count(), 2, "{json}");
    }

    #[test]
    fn viewed_products_are_rows_and_earlier_maps_still_read() {
        let viewed = ViewedProduct {
            product_id: "p0071".into(),
            name: Some("kids #71".into()),
            category: Some("kids".into()),
            price: Some(35.39),
            at: 1_767_225_691_416,
            reported_at: None,
        };
        // The form profiles were written in before rows: a map with field names.
        let mut earlier = vec![0xC1];
        rmp_serde::encode::write_named(&mut earlier, &viewed).unwrap();
        let row = encode_state(&viewed).unwrap();
        assert!(
            row.len() * 3 < earlier.len() * 2,
            "a row ({} bytes) is much smaller than a map ({} bytes)",
            row.len(),
            earlier.len()
        );
        assert_eq!(decode_state::<ViewedProduct>(&row).unwrap(), viewed);
        assert_eq!(decode_state::<ViewedProduct>(&earlier).unwrap(), viewed);
        // A row of the five fields it had before `reported_at`.
        let five = rmp_serde::to_vec(&("p0071", "kids #71", "kids", 35.39, 1_767_225_691_416i64))
            .expect("encode");
        assert_eq!(
            rmp_serde::from_slice::<ViewedProduct>(&five).ok(),
            Some(viewed.clone())
        );
        // A whole profile round-trips, also through JSON (a merge hands it over so).
        let mut profile = CustomerProfile::new("c1", 1);
        profile.recently_viewed = vec![viewed.clone(), viewed];
        let back: CustomerProfile = decode_state(&encode_state(&profile).unwrap()).unwrap();
        assert_eq!(back, profile);
        let json = serde_json::to_value(&profile).unwrap();
        assert_eq!(
            serde_json::from_value::<CustomerProfile>(json).unwrap(),
            profile
        );
    }
    use kairos_core::contracts::MessageCategory;

    fn outcome(channel: Channel, kind: OutcomeKind, at: Millis) -> Outcome {
        Outcome {
            outcome_id: format!("o-{at}"),
            send_id: "s1".into(),
            customer_id: "c1".into(),
            scenario: "welcome".into(),
            channel,
            category: MessageCategory::trigger,
            kind,
            reason: None,
            occurred_at: at,
            address: None,
        }
    }

    #[test]
    fn only_a_row_that_cannot_time_its_opt_ins_counts_a_stated_withdrawal_as_an_opt_in() {
        let mut withdrew = CustomerProfile::new("c1", 0);
        withdrew.consents.insert(Channel::email, false);
        withdrew.consent_at.insert(Channel::email, 10);
        assert!(!withdrew.opted_in_before(), "a withdrawal is no opt-in");
        // The same row as a version before `opt_ins_tracked` wrote it.
        let mut legacy = withdrew.clone();
        legacy.opt_ins_tracked = false;
        assert!(legacy.opted_in_before(), "whether it opted in is unknown");
        let mut subscribed = withdrew.clone();
        subscribed.subscribed_at = Some(5);
        assert!(subscribed.opted_in_before());
        // A merge with an older row inherits its doubt.
        withdrew.absorb(legacy);
        assert!(withdrew.opted_in_before());
    }

    /// `p` stated `granted` for `channel` at `at`.
    fn said(channel: Channel, granted: bool, at: Millis, p: &mut CustomerProfile) {
        p.consents.insert(channel, granted);
        p.consent_at.insert(channel, at);
    }

    #[test]
    fn a_merge_keeps_the_later_word_on_each_channel() {
        let mut survivor = CustomerProfile::new("c1", 0);
        let mut merged = CustomerProfile::new("c2", 0);
        // E-mail: unsubscribed on the merged id, opted in later on the survivor.
        said(Channel::email, false, 30, &mut merged);
        said(Channel::email, true, 50, &mut survivor);
        // SMS: opted in on the survivor, withdrawn later on the merged id.
        said(Channel::sms, true, 10, &mut survivor);
        said(Channel::sms, false, 20, &mut merged);
        // Push: both at one instant, a withdrawal and an opt-in.
        said(Channel::push, true, 40, &mut survivor);
        said(Channel::push, false, 40, &mut merged);
        // Messenger: only the merged id said anything.
        said(Channel::messenger, true, 5, &mut merged);
        // In-app: withdrawn on the survivor, opted in later on the merged id.
        said(Channel::in_app, false, 30, &mut survivor);
        said(Channel::in_app, true, 50, &mut merged);
        survivor.absorb(merged);
        let consent = |c| survivor.consents.get(&c).copied();
        assert_eq!(consent(Channel::email), Some(true), "the later opt-in");
        assert_eq!(consent(Channel::sms), Some(false), "the later withdrawal");
        assert_eq!(
            consent(Channel::push),
            Some(false),
            "a withdrawal wins a tie"
        );
        assert_eq!(consent(Channel::messenger), Some(true));
        assert_eq!(
            consent(Channel::in_app),
            Some(true),
            "the merged id's later opt-in"
        );
        assert_eq!(survivor.consent_at.get(&Channel::email), Some(&50));
    }

    #[test]
    fn a_merge_s_consent_follows_the_address_kept() {
        let mut survivor = CustomerProfile::new("c1", 0);
        let mut merged = CustomerProfile::new("c2", 0);
        // E-mail: two addresses; the survivor keeps its own, and its opt-in, whatever
        // the other address's owner said later.
        survivor.email = Some("a@example.com".into());
        merged.email = Some("b@example.com".into());
        said(Channel::email, true, 50, &mut survivor);
        said(Channel::email, false, 60, &mut merged);
        // SMS: only the merged profile has a phone, and it unsubscribed it; the
        // survivor's later opt-in was said of no phone.
        merged.phone = Some("+4915100000001".into());
        said(Channel::sms, false, 10, &mut merged);
        said(Channel::sms, true, 50, &mut survivor);
        // Push: one token on both (written differently); the later word counts.
        survivor.push_token = Some("TOKEN-1".into());
        merged.push_token = Some(" token-1".into());
        said(Channel::push, false, 10, &mut survivor);
        said(Channel::push, true, 20, &mut merged);
        // Messenger: the survivor's own id, of which it said nothing.
        survivor.messenger_id = Some("m-1".into());
        merged.messenger_id = Some("m-2".into());
        said(Channel::messenger, true, 5, &mut merged);
        survivor.absorb(merged);
        let consent = |c| survivor.consents.get(&c).copied();
        assert_eq!(consent(Channel::email), Some(true));
        assert_eq!(survivor.consent_at.get(&Channel::email), Some(&50));
        assert_eq!(survivor.email.as_deref(), Some("a@example.com"));
        assert_eq!(consent(Channel::sms), Some(false));
        assert_eq!(
            survivor.consent_at.get(&Channel::sms),
            Some(&10),
            "the time of the statement that counts"
        );
        assert_eq!(consent(Channel::push), Some(true));
        assert_eq!(consent(Channel::messenger), None);
        assert_eq!(survivor.consent_at.get(&Channel::messenger), None);

        // Said of no address, a later withdrawal carries over; a later opt-in does not.
        let mut survivor = CustomerProfile::new("c1", 0);
        let mut merged = CustomerProfile::new("c2", 0);
        survivor.email = Some("a@example.com".into());
        said(Channel::email, true, 10, &mut survivor);
        said(Channel::email, false, 20, &mut merged);
        survivor.phone = Some("+4915100000001".into());
        said(Channel::sms, false, 10, &mut survivor);
        said(Channel::sms, true, 20, &mut merged);
        survivor.push_token = Some("token-1".into());
        said(Channel::push, true, 5, &mut merged);
        survivor.absorb(merged);
        assert_eq!(
            survivor.consents.get(&Channel::push),
            None,
            "no word of the token"
        );
        assert_eq!(survivor.consents.get(&Channel::email), Some(&false));
        assert_eq!(survivor.consents.get(&Channel::sms), Some(&false));
        assert_eq!(survivor.consent_at.get(&Channel::sms), Some(&10));

        // One mailbox, stored in its Unicode spelling by an earlier version on one
        // side: the later word counts, as for one address.
        let mut survivor = CustomerProfile::new("c1", 0);
        let mut merged = CustomerProfile::new("c2", 0);
        survivor.email = Some("anna@bücher.de".into());
        merged.email = Some("anna@xn--bcher-kva.de".into());
        said(Channel::email, true, 10, &mut survivor);
        said(Channel::email, false, 20, &mut merged);
        survivor.absorb(merged);
        assert_eq!(survivor.consents.get(&Channel::email), Some(&false));
    }

    /// An open reported late, of an earlier message, leaves the messages delivered
    /// after it ignored, as if read in time order.
    #[test]
    fn an_open_reported_late_ends_the_row_only_up_to_its_time() {
        let mut p = CustomerProfile::new("c1", 0);
        for delivered in [10, 20, 30] {
            p.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, delivered));
        }
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::opened, 15));
        assert_eq!(p.engagement[&Channel::email].ignored_in_row, 2);
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::clicked, 35));
        assert_eq!(p.engagement[&Channel::email].ignored_in_row, 0);
    }

    /// Two merged profiles ignored messages on one channel: the merged row is every
    /// delivery of either after the later open, not the longer row alone.
    #[test]
    fn a_merge_counts_both_rows_of_ignored_messages_after_the_later_open() {
        let mut survivor = CustomerProfile::new("c1", 0);
        let mut merged = CustomerProfile::new("c2", 0);
        for delivered in [10, 20, 30] {
            survivor.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, delivered));
        }
        merged.apply_outcome(&outcome(Channel::email, OutcomeKind::opened, 25));
        for delivered in [40, 50] {
            merged.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, delivered));
        }
        survivor.absorb(merged);
        let e = &survivor.engagement[&Channel::email];
        assert_eq!(
            (e.ignored_in_row, e.ignored_delivered_at.as_slice()),
            (3, [30, 40, 50].as_slice())
        );
    }

    /// A late open older than every delivery a full row remembers leaves the count:
    /// the older ones counted may have come after it too.
    #[test]
    fn a_late_open_older_than_a_full_row_keeps_its_count() {
        let mut p = CustomerProfile::new("c1", 0);
        for delivered in 10..50 {
            p.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, delivered));
        }
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::opened, 5));
        assert_eq!(p.engagement[&Channel::email].ignored_in_row, 40);
    }

    #[test]
    fn a_delivery_reported_after_its_open_is_not_ignored() {
        let mut p = CustomerProfile::new("c1", 0);
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::opened, 20));
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, 10));
        assert_eq!(p.engagement[&Channel::email].ignored_in_row, 0);
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, 30));
        assert_eq!(p.engagement[&Channel::email].ignored_in_row, 1);
    }

    #[test]
    fn outcomes_update_engagement_and_suppressions() {
        let mut p = CustomerProfile::new("c1", 0);
        p.email = Some("c1@example.com".into());
        p.consents.insert(Channel::email, true);
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, 10));
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::delivered, 20));
        assert_eq!(p.engagement[&Channel::email].ignored_in_row, 2);
        assert_eq!(p.engagement[&Channel::email].last_delivered_at, Some(20));
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::opened, 30));
        let e = &p.engagement[&Channel::email];
        assert_eq!((e.ignored_in_row, e.last_opened_at), (0, Some(30)));
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::clicked, 40));
        assert_eq!(p.engagement[&Channel::email].last_clicked_at, Some(40));

        p.apply_outcome(&Outcome {
            address: Some("c1@example.com".into()),
            ..outcome(Channel::email, OutcomeKind::bounced_hard, 50)
        });
        assert_eq!(
            p.hard_bounced.get(&Channel::email).map(String::as_str),
            Some("c1@example.com")
        );
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::complained, 60));
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::complained, 70));
        assert_eq!(p.complained_at, Some(60), "the first complaint counts");
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::unsubscribed, 80));
        assert_eq!(p.consents.get(&Channel::email), Some(&false));
    }

    #[test]
    fn a_late_hard_bounce_marks_the_address_the_send_went_to() {
        let mut p = CustomerProfile::new("c1", 0);
        p.email = Some("old@x".into());
        p.email = Some("new@x".into());
        let bounce = Outcome {
            address: Some("old@x".into()),
            ..outcome(Channel::email, OutcomeKind::bounced_hard, 50)
        };
        p.apply_outcome(&bounce);
        assert_eq!(
            p.hard_bounced.get(&Channel::email).map(String::as_str),
            Some("old@x")
        );
        assert_eq!(
            crate::contacts(&p).email.as_deref(),
            Some("new@x"),
            "the new address stays usable"
        );
        // A bounce that does not say its address bars none of the profile's.
        let mut p = CustomerProfile::new("c2", 0);
        p.email = Some("new@x".into());
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::bounced_hard, 60));
        assert_eq!(p.hard_bounced.get(&Channel::email), None);
        assert_eq!(crate::contacts(&p).email.as_deref(), Some("new@x"));
    }

    #[test]
    fn an_unsubscribe_older_than_the_stated_consent_changes_nothing() {
        let mut p = CustomerProfile::new("c1", 0);
        assert!(p.state_consent(Channel::email, true, 100));
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::unsubscribed, 90));
        assert_eq!(
            p.consents.get(&Channel::email),
            Some(&true),
            "older: ignored"
        );
        p.apply_outcome(&outcome(Channel::email, OutcomeKind::unsubscribed, 110));
        assert_eq!(p.consents.get(&Channel::email), Some(&false));
        assert!(
            !p.state_consent(Channel::email, true, 105),
            "older than the unsubscribe"
        );
        assert_eq!(p.consents.get(&Channel::email), Some(&false));
    }

    #[test]
    fn orders_stored_before_a_field_was_appended_still_read() {
        // A row of the four fields `OrderRecord` had when it was first stored.
        let row = rmp_serde::to_vec(&("o-1", 80.0, 10i64, true)).expect("encode");
        let read: OrderRecord = rmp_serde::from_slice(&row).expect("an older row reads");
        assert_eq!(
            read,
            OrderRecord {
                order_id: "o-1".into(),
                total: 80.0,
                at: 10,
                reversed: true,
                offline: false,
                statuses: 0,
                delivered_at: None,
                cancelled: false,
                returned_amount: 0.0,
                returned_parts: Vec::new(),
            }
        );
    }

    #[test]
    fn a_withdrawal_and_an_opt_in_stated_at_the_same_time_leave_it_withdrawn() {
        let mut p = CustomerProfile::new("c1", 0);
        assert!(p.state_consent(Channel::email, false, 100));
        assert!(!p.state_consent(Channel::email, true, 100));
        assert_eq!(p.consents.get(&Channel::email), Some(&false));
        let mut q = CustomerProfile::new("c2", 0);
        assert!(q.state_consent(Channel::email, true, 100));
        assert!(q.state_consent(Channel::email, false, 100));
        assert_eq!(q.consents.get(&Channel::email), Some(&false));
    }

    #[test]
    fn returns_and_cancellations_take_out_what_the_order_counted_once() {
        let mut p = CustomerProfile::new("c1", 0);
        assert_eq!(
            p.record_purchase(10, 80.0, false, Some("o-1".into())),
            PurchaseApplied::Counted
        );
        assert_eq!(
            p.record_purchase(20, 20.0, true, Some("r-2".into())),
            PurchaseApplied::Counted
        );
        assert_eq!(
            p.record_purchase(25, 40.0, false, Some("o-3".into())),
            PurchaseApplied::Counted
        );
        assert!(
            p.record_purchase(30, 80.0, false, Some("o-1".into()))
                == PurchaseApplied::AlreadyCounted,
            "re-sent"
        );
        assert_eq!((p.orders, p.offline_orders, p.revenue), (3, 1, 140.0));
        // A return without an amount: the order's own; still an order.
        let returned = p.record_return("o-1", None, 0, ReversalKind::Return);
        assert_eq!(returned, Reversal::Applied { known: true });
        assert_eq!((p.orders, p.returns, p.revenue), (3, 1, 60.0));
        assert!(p.order_reversed("o-1"));
        let again = p.record_return("o-1", Some(80.0), 0, ReversalKind::Return);
        assert_eq!(again, Reversal::AlreadyReversed);
        assert_eq!((p.returns, p.revenue), (1, 60.0));
        // A cancelled till sale is no order at all.
        let cancelled = p.record_return("r-2", None, 0, ReversalKind::Cancellation);
        assert_eq!(cancelled, Reversal::Applied { known: true });
        assert_eq!((p.orders, p.offline_orders, p.returns), (2, 0, 1));
        assert_eq!(p.revenue, 40.0);
        assert_eq!(p.average_order_value(), Some(20.0));
        // An order it does not hold, while it holds every order it counted: never
        // counted here, so nothing comes out (an older one is taken out, tested with
        // a full list of orders in the merge tests).
        let unknown = p.record_return("o-other", Some(10.0), 0, ReversalKind::Cancellation);
        assert_eq!(unknown, Reversal::Applied { known: false });
        assert_eq!((p.orders, p.revenue), (2, 40.0));
        // A till refund names no order: its own amount, once per refund receipt.
        assert_eq!(
            p.record_refund("rf-1", 5.0, 0),
            Reversal::Applied { known: false }
        );
        assert_eq!(p.record_refund("rf-1", 5.0, 0), Reversal::AlreadyReversed);
        assert_eq!((p.returns, p.revenue), (2, 35.0));
    }

    #[test]
    fn a_till_refund_read_before_its_sale_still_takes_the_sale_s_amount() {
        let mut p = CustomerProfile::new("c1", 0);
        // Refunded the next day at another store, whose receipt came first.
        p.record_refund("rf-1", 100.0, DAY);
        assert_eq!(p.revenue, 0.0);
        // A sale after the refund is not what it refunded.
        p.record_purchase(2 * DAY, 50.0, true, Some("sale-2".into()));
        assert_eq!(p.revenue, 50.0);
        p.record_purchase(0, 100.0, true, Some("sale-1".into()));
        assert_eq!((p.orders, p.returns, p.revenue), (2, 1, 50.0));
        assert!(p.refund_shortfalls.is_empty());
        // Part of a refund covered when it came, the rest by a sale read later.
        p.record_refund("rf-2", 80.0, 3 * DAY);
        assert_eq!(p.revenue, 0.0);
        p.record_purchase(2 * DAY + HOUR, 40.0, true, Some("sale-3".into()));
        assert_eq!(p.revenue, 10.0);
        // A sale before a refund pays at most its own amount: a later sale's revenue
        // is no part of what the refund took back.
        let mut q = CustomerProfile::new("c2", 0);
        q.record_refund("rf-3", 100.0, DAY);
        q.record_purchase(2 * DAY, 50.0, true, Some("sale-4".into()));
        q.record_purchase(0, 30.0, true, Some("sale-5".into()));
        assert_eq!(q.revenue, 50.0);
    }

    #[test]
    fn a_till_sale_older_than_the_last_cart_change_leaves_the_cart() {
        let mut p = CustomerProfile::new("c1", 0);
        p.cart.push(LineItem {
            product_id: "p-1".into(),
            name: None,
            category: None,
            quantity: 1,
            unit_price: 5.0,
        });
        p.cart_updated_at = Some(100);
        assert_eq!(
            p.record_purchase(90, 40.0, true, Some("r-1".into())),
            PurchaseApplied::Counted
        );
        assert_eq!(p.cart.len(), 1);
        // Online, the cart is what was bought, whatever the device's clock said.
        assert_eq!(
            p.record_purchase(95, 5.0, false, Some("o-2".into())),
            PurchaseApplied::Counted
        );
        assert!(p.cart.is_empty());
        assert_eq!(p.last_order_id.as_deref(), Some("o-2"));
        assert_eq!(
            p.record_purchase(93, 5.0, false, Some("o-3".into())),
            PurchaseApplied::Counted
        );
        assert_eq!(p.last_order_id.as_deref(), Some("o-2"), "the latest stays");
    }

    fn cart_change(kind: &str, product: &str, quantity: i32, at: Millis) -> CustomerEvent {
        let mut event: CustomerEvent = serde_json::from_value(serde_json::json!({
            "event_id": format!("{kind}-{product}-{at}"),
            "event_type": kind,
            "occurred_at": "2000-01-01T00:00:00Z",
            "items": [{"product_id": product, "quantity": quantity, "unit_price": 5.0}],
        }))
        .expect("a cart change");
        // Small times keep the orderings below readable; input refuses them.
        event.occurred_at = at;
        event
    }

    fn quantities(p: &CustomerProfile) -> Vec<(&str, i32)> {
        p.cart
            .iter()
            .map(|i| (i.product_id.as_str(), i.quantity))
            .collect()
    }

    #[test]
    fn a_cart_keeps_its_latest_products_and_a_quantity_saturates() {
        let mut p = CustomerProfile::new("c1", 0);
        for i in 0..(MAX_CART_ITEMS as i64 + 50) {
            p.update_cart(&cart_change("add_to_cart", &format!("p-{i}"), 1, 100 + i));
        }
        assert_eq!(p.cart.len(), MAX_CART_ITEMS);
        assert_eq!(
            p.cart[0].product_id, "p-50",
            "the earliest additions left first"
        );
        assert_eq!(
            p.cart.last().map(|i| i.product_id.as_str()),
            Some(format!("p-{}", MAX_CART_ITEMS + 49).as_str())
        );
        // Validation bounds one event's quantity; many events must not wrap around.
        p.update_cart(&cart_change("add_to_cart", "p-60", i32::MAX, 1_000));
        p.update_cart(&cart_change("add_to_cart", "p-60", i32::MAX, 1_001));
        let held = p
            .cart
            .iter()
            .find(|i| i.product_id == "p-60")
            .map(|i| i.quantity);
        assert_eq!(held, Some(i32::MAX));
        assert!(p.cart_value() > 0.0, "{}", p.cart_value());
    }

    #[test]
    fn a_removal_arriving_before_the_addition_it_undoes_cancels_it() {
        let day = kairos_core::time::DAY;
        let mut p = CustomerProfile::new("c1", 0);
        // Two taken out at 200 of the three put in at 100, arriving the other way round.
        p.update_cart(&cart_change("remove_from_cart", "p-1", 2, 200));
        assert!(p.cart.is_empty());
        p.update_cart(&cart_change("add_to_cart", "p-1", 3, 100));
        assert_eq!(quantities(&p), [("p-1", 1)]);
        p.update_cart(&cart_change("add_to_cart", "p-1", 1, 150));
        assert_eq!(quantities(&p), [("p-1", 2)], "the removal was used up");
        // An addition made after the removal is a new one.
        p.update_cart(&cart_change("remove_from_cart", "p-2", 1, 300));
        p.update_cart(&cart_change("add_to_cart", "p-2", 1, 400));
        assert_eq!(quantities(&p), [("p-1", 2), ("p-2", 1)]);
        // A removal waits a day for its addition, then is forgotten.
        p.update_cart(&cart_change("remove_from_cart", "p-3", 1, 500));
        p.update_cart(&cart_change("add_to_cart", "p-4", 1, 500 + day + 1));
        p.update_cart(&cart_change("add_to_cart", "p-3", 1, 450));
        assert_eq!(
            quantities(&p),
            [("p-1", 2), ("p-2", 1), ("p-4", 1), ("p-3", 1)]
        );
        assert!(p.pending_cart_removals.is_empty());
        // A removal that found part of what it took away keeps only the rest.
        p.update_cart(&cart_change("remove_from_cart", "p-4", 3, 600 + day));
        assert_eq!(p.pending_cart_removals.len(), 1);
        assert_eq!(p.pending_cart_removals[0].quantity, 2);
    }
}
