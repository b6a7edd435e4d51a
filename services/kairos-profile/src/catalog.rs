//! The catalog join: catalog updates meet customer interest, keyed by product.
//!
//! The profile processor publishes each customer's interest in a product (viewed,
//! wishlisted) to `product-interest`, keyed by product id and co-partitioned with
//! `catalog`. This processor keeps, per product, its last price and stock, the highest
//! price since the last announced drop and the prices of the 30-day audience window
//! (what a drop is measured against), and an index of interested customers under the
//! product:
//! - `vd/<product>/<day>`: who viewed the product that day (customer -> latest view),
//!   deleted on a timer once past the interest window;
//! - `w/<product>/<customer>`: who wishlisted it.
//!
//! A price drop or a return to stock reads only that product's index (no scan over
//! customers) and publishes a product occasion per interested customer, keyed by
//! customer id, back to the profile processor, which applies consent, scenarios and
//! thresholds. The product keeps its latest announcement of each kind, so interest
//! from before it that arrives after it (the two topics are read apart) is told too.
//!
//! Views are kept per product and day rather than per product and customer: a view is
//! about every other event, and one key per view made the catalog join's writes nearly
//! half of all keys the profile replay wrote (the memtable's cost is per key). A
//! batch's views are gathered in memory and written once per product and day when it
//! commits. Views indexed by an earlier version under `v/<product>/<customer>` are
//! still read, and deleted once older than the audience window, as before.

use anyhow::Context;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use compact_str::CompactString;
use foldhash::{HashMap, HashMapExt};

use kairos_core::config::{topics, Config, ScenarioKind};
use kairos_core::contracts::{
    CatalogUpdate, DeadLetterReason, InterestKind, ProductInterest, ProductOccasion,
    ProductOccasionKind,
};
use kairos_core::encoding::{decode_input, decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::deterministic_id;
use kairos_core::replay::partition_for;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::schemas;
use kairos_core::store::DueTimer;
use kairos_core::time::{ClockMode, Millis, DAY};
use serde::{Deserialize, Serialize};

/// Products whose announcements the join holds in memory per partition (see
/// `CatalogJoin::news`).
const NEWS_CACHED_PER_PARTITION: usize = 100_000;

/// How long a view keeps a customer in a product's audience.
pub const VIEW_INTEREST_DAYS: i64 = 30;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ProductState {
    name: Option<String>,
    price: Option<f64>,
    in_stock: Option<bool>,
    /// The highest price since the last announced drop (None in older rows: the last
    /// price), read as at most the window's highest: small steps down add up to a
    /// drop worth announcing.
    #[serde(default)]
    reference_price: Option<f64>,
    /// The time of the update that set `price` (None in older rows): an older one
    /// arriving later (a feed re-sent, two feeders) neither moves the price back nor
    /// announces a drop.
    #[serde(default)]
    price_at: Option<Millis>,
    /// The time of the update that set `in_stock`, likewise.
    #[serde(default)]
    stock_at: Option<Millis>,
    /// The latest announcement of each kind: interest dated before it that arrives
    /// after it (the profile publishes a batch's interest when it commits, and may be
    /// behind the catalog for hours after an outage) still hears of it.
    #[serde(default)]
    news: Vec<News>,
    /// The time of the update that set `name` (None in older rows), likewise: an
    /// older update read later does not bring back the old name.
    #[serde(default)]
    name_at: Option<Millis>,
    /// The prices of the audience window by day, oldest first, and the last day
    /// before it (whose closing price held at the window's start): a drop is measured
    /// from the window's highest price too (see [`ProductState::window_prices`]). Empty
    /// in older rows (`reference_price` stands in).
    #[serde(default)]
    price_days: Vec<PriceDay>,
    /// The price and time of the last announced drop.
    #[serde(default)]
    announced_price: Option<f64>,
    #[serde(default)]
    announced_at: Option<Millis>,
    /// The latest prices replaced within the window, each with when it was replaced
    /// (at most [`REPLACED_PRICES_KEPT`], oldest first): prices customers may have
    /// seen that a day's highest and closing price do not show (92 between 100 and 89
    /// on one day).
    #[serde(default)]
    replaced_prices: Vec<(f64, Millis)>,
    /// The lowest price of the 30 days before `price` took effect (None in older
    /// rows): the prior price a drop to it states when it is told later (a cut while
    /// sold out, told at the return).
    #[serde(default)]
    low_before_price: Option<f64>,
}

/// Replaced prices a product keeps (see `ProductState::replaced_prices`).
const REPLACED_PRICES_KEPT: usize = 32;

/// A day (UTC) of a product's prices: its highest, the price it closed at, and its
/// lowest (None in older rows).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct PriceDay {
    day: i64,
    high: f64,
    close: f64,
    #[serde(default)]
    low: Option<f64>,
}

impl ProductState {
    /// Prices in effect in the audience window before `at`, as kept: each day's
    /// highest and closing price, the price that held when the window began, the
    /// latest prices replaced, and the current one (a row from before the days were
    /// kept: its reference and price). Their highest is the most any viewer in the
    /// window can have seen, so a drop from it smaller than the scenarios' is news to
    /// no one, and one at least as big may be news to some (the profile measures each
    /// customer from the price they saw, or were last told).
    fn window_prices(&self, at: Millis) -> Vec<f64> {
        if self.price_days.is_empty() {
            return self.reference_price.into_iter().chain(self.price).collect();
        }
        let first_day = audience_first_day(at);
        let in_window = self.price_days.iter().filter(|d| d.day >= first_day);
        let carried = (self.price_days.iter().rev())
            .find(|d| d.day < first_day)
            .map(|d| d.close);
        let replaced = (self.replaced_prices.iter())
            .filter(|(_, until)| until.div_euclid(DAY) >= first_day)
            .map(|(price, _)| *price);
        (in_window.flat_map(|d| [d.high, d.close]))
            .chain(carried)
            .chain(replaced)
            .chain(self.price)
            .collect()
    }

    /// The lowest price in effect in the audience window before `at`: of the prices
    /// [`ProductState::window_prices`] gives, and each day's lowest.
    fn window_low(&self, at: Millis, window_prices: &[f64]) -> Option<f64> {
        let first_day = audience_first_day(at);
        let day_lows = (self.price_days.iter())
            .filter(|d| d.day >= first_day)
            .filter_map(|d| d.low);
        (window_prices.iter().copied())
            .chain(day_lows)
            .reduce(f64::min)
    }

    /// Notes that the price held until `at` was replaced by another.
    fn note_replaced(&mut self, at: Millis) {
        let Some(held) = self.price else {
            return;
        };
        self.replaced_prices.push((held, at));
        let first_day = audience_first_day(at);
        self.replaced_prices
            .retain(|(_, until)| until.div_euclid(DAY) >= first_day);
        let excess = self
            .replaced_prices
            .len()
            .saturating_sub(REPLACED_PRICES_KEPT);
        self.replaced_prices.drain(..excess);
    }

    /// Records `price` as set at `at` (updates apply in time order), keeping the days
    /// of the window and the one before it.
    fn record_price(&mut self, price: f64, at: Millis) {
        let day = at.div_euclid(DAY);
        match self.price_days.last_mut() {
            Some(last) if last.day >= day => {
                last.high = last.high.max(price);
                last.low = Some(last.low.unwrap_or(last.close).min(price));
                last.close = price;
            }
            _ => self.price_days.push(PriceDay {
                day,
                high: price,
                close: price,
                low: Some(price),
            }),
        }
        let first_day = day - VIEW_INTEREST_DAYS;
        while self.price_days.get(1).is_some_and(|d| d.day < first_day) {
            self.price_days.remove(0);
        }
    }

    /// The announcements interest that reaches the join late is told of: none while
    /// the product is sold out (a drop kept through it is told again once it is back).
    fn told_late(&self) -> Vec<News> {
        match self.in_stock {
            Some(false) => Vec::new(),
            _ => self.news.clone(),
        }
    }
}

/// A price drop or a return to stock as it was announced.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct News {
    kind: ProductOccasionKind,
    event_id: String,
    occurred_at: Millis,
    old_price: Option<f64>,
    new_price: Option<f64>,
    product_name: Option<String>,
    /// With a drop: the lowest price of the 30 days before it (see
    /// [`ProductOccasion::lowest_price`]). None in rows of earlier versions.
    #[serde(default)]
    lowest_price: Option<f64>,
}

impl News {
    /// Whether a customer's interest at `at` (a wish, else a view) makes them one the
    /// announcement was for: shown before it, a view within the audience window.
    fn reaches(&self, at: Millis, wished: bool) -> bool {
        // Whole days, as the audience's views are kept (see `apply_update`).
        let first_day = audience_first_day(self.occurred_at);
        at < self.occurred_at
            && (wished
                || (self.kind == ProductOccasionKind::price_drop
                    && at.div_euclid(DAY) >= first_day))
    }

    /// Whether this is a drop announced by the same update as a return to stock
    /// among `news`: a wisher, who hears of the return, hears of the new price in it
    /// (its `old_price` is the drop's), not in a second message.
    fn told_with_return(&self, news: &[&News]) -> bool {
        self.kind == ProductOccasionKind::price_drop
            && news.iter().any(|n| {
                n.kind == ProductOccasionKind::back_in_stock
                    && n.event_id == self.event_id
                    && n.occurred_at == self.occurred_at
            })
    }

    /// Whether the announcement is still true of the product's price now: not a drop
    /// whose price rose since. Interest that reaches the join late hears only of what
    /// still holds, and nothing while the product is sold out (see
    /// [`ProductState::told_late`]; the next return to stock replaces the last one).
    fn still_holds(&self, price: Option<f64>) -> bool {
        match (self.kind, price, self.new_price) {
            (ProductOccasionKind::price_drop, Some(now), Some(announced)) => now <= announced,
            _ => true,
        }
    }

    /// A return to stock told with a drop (was 100, now 80) whose price rose since is
    /// told late at the price now, without the drop. True if it changed.
    fn follow_price(&mut self, price: Option<f64>) -> bool {
        let risen = matches!((price, self.new_price), (Some(now), Some(told)) if now > told);
        let follows = self.kind == ProductOccasionKind::back_in_stock && risen;
        if follows {
            self.old_price = None;
            self.lowest_price = None;
            self.new_price = price;
        }
        follows
    }

    fn occasion_for(&self, product_id: &str, customer: &str) -> ProductOccasion {
        ProductOccasion {
            occasion_id: occasion_id(&self.event_id, product_id, customer, self.kind),
            customer_id: customer.to_string(),
            product_id: product_id.to_string(),
            product_name: self.product_name.clone(),
            kind: self.kind,
            old_price: self.old_price,
            new_price: self.new_price,
            cause_event_id: self.event_id.clone(),
            occurred_at: self.occurred_at,
            lowest_price: self.lowest_price,
        }
    }
}

/// The views of one product on one day: customer -> latest view.
type DayViews = BTreeMap<String, Millis>;

/// A batch's views not written yet: product -> day -> customer -> latest view. By
/// product first, so a price change takes its product's views without looking at the
/// batch's other products.
type BatchViews = HashMap<CompactString, HashMap<i64, HashMap<String, Millis>>>;

/// How many per cent `new` is below `old` (0 for no drop), to a millionth of a per
/// cent: in floating point 1.00 to 0.90 is 9.999999999999998%, short of a 10% rule.
pub(crate) fn drop_percent(old: f64, new: f64) -> f64 {
    if old > 0.0 && new < old {
        (100.0 * (old - new) / old * 1e6).round() / 1e6
    } else {
        0.0
    }
}

/// The first day (UTC, days since the epoch) of the audience window of a change at
/// `at`: views are kept by day, so the window takes its first day whole.
fn audience_first_day(at: Millis) -> i64 {
    (at - VIEW_INTEREST_DAYS * DAY).div_euclid(DAY)
}

/// The key of a product's views on `day` (days since the epoch, UTC), fixed-width so
/// the days of a product scan in order.
fn day_views_key(product_id: &str, day: i64) -> String {
    format!("vd/{product_id}/{:010}", day.max(0))
}

/// The key of overflow piece `piece` (1 to [`DAY_VIEW_PIECES`]) of a product's views on
/// `day`: `vd/<product>/<day>.<piece>`.
fn day_views_piece_key(product_id: &str, day: i64, piece: u64) -> String {
    format!("vd/{product_id}/{:010}.{piece:03}", day.max(0))
}

/// The day a key of `vd/<product>/` names, from the rest of the key after that prefix:
/// a fixed-width day, or a day and an overflow piece. None for another product's key
/// (a product id with a slash can share the prefix).
fn day_of_views_key(suffix: &str) -> Option<i64> {
    let piece_ok = match suffix.len() {
        10 => true,
        14 => suffix.as_bytes()[10] == b'.' && suffix[11..].bytes().all(|b| b.is_ascii_digit()),
        _ => false,
    };
    let day = suffix.get(..10)?;
    (piece_ok && day.bytes().all(|b| b.is_ascii_digit()))
        .then(|| day.parse().ok())
        .flatten()
}

/// Customers a product's views of one day keep in its first value; later viewers go to
/// overflow pieces by customer. A value is rewritten whole at every commit that adds to
/// it and goes whole to the changelog, whose broker refuses a record above 1 MB (about
/// 19,000 viewers): a popular product's day would stop the join's publishing for good.
const DAY_VIEWS_PER_VALUE: usize = 4_096;
/// Overflow pieces per product and day: a million viewers a day still leave each piece
/// about the first value's size.
const DAY_VIEW_PIECES: u64 = 255;

/// Timers that delete a product's views of a day once no drop can read them any more
/// (`~vd/<product>/<day>`, payload: the key): a product viewed every day that never
/// drops would otherwise keep a key per day for good.
const DAY_VIEWS_EXPIRY: &str = "~vd";

/// Timers that tell an announcement's audience past `profile.audience_per_commit`, on
/// the wall clock, over the commits after the update's (`~fo/<job>`, payload: the
/// job's key, `fo/<job>`; its chunks are `fo/<job>/<n>`): the audience is taken when
/// the update is read, and stored in chunks in the same commit. A version without
/// them, rolled back to, leaves the rest of an audience untold and its keys stored.
const FAN_OUT: &str = "~fo";

/// An announcement whose audience is told in chunks.
#[derive(Debug, Serialize, Deserialize)]
struct FanOut {
    product_id: String,
    /// The announcements of the update, as made: each chunk tells those of them that
    /// still hold, as the product's state has them then.
    news: Vec<News>,
    chunks: u32,
    /// The next chunk to tell.
    next: u32,
}

/// One customer of an announcement's audience, and whether they wished the product.
type Listener = (String, bool);

/// From one chunk of a fan-out to the next: past the firing that told one (a firing
/// takes the timers due at its start), so the next goes with a later commit.
const FAN_OUT_PAUSE: Millis = 1_000;

/// Customers of a fan-out stored under one key: a customer id is at most 200 bytes, so
/// a chunk stays well within a changelog record's 1 MB.
const STORED_CHUNK: usize = 2_000;

fn chunk_key(job_key: &str, n: usize) -> String {
    format!("{job_key}/{n:08}")
}

/// The id of the occasion a catalog update makes for one customer: the same for the
/// same update, product and customer, whoever sends it (the join, or the profile
/// processor sending it on to the customer a merged one became). The product is part
/// of it: a feed may give one event id to the updates of a whole run.
pub fn occasion_id(
    update_event_id: &str,
    product_id: &str,
    customer_id: &str,
    kind: ProductOccasionKind,
) -> String {
    deterministic_id(&[
        update_event_id,
        product_id,
        customer_id,
        &format!("{kind:?}"),
    ])
}

/// What a wish key holds: the customer (so a scan of `w/<product>/` can tell a wish of
/// product `a` by customer `b/c` from one of product `a/b` by `c`), or `true` in rows
/// written before.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum WishEntry {
    Customer(String),
    Legacy(bool),
}

/// A product id as one key component: `%` and `/` escaped, so `w/<product>/` holds the
/// wishes of that product alone and product `a` with customer `b/c` cannot share a key
/// with product `a/b` and customer `c`. Ids with neither (nearly all) are unchanged,
/// so their rows written before still read.
fn product_key_part(product_id: &str) -> Cow<'_, str> {
    if product_id.contains(['/', '%']) {
        Cow::Owned(product_id.replace('%', "%25").replace('/', "%2F"))
    } else {
        Cow::Borrowed(product_id)
    }
}

/// Where a product's wishes are: `w/<escaped product>/`.
fn wishes_prefix(product_id: &str) -> String {
    ["w/", &product_key_part(product_id), "/"].concat()
}

/// The key of `i`'s customer's wish of `i`'s product.
fn wish_key(i: &ProductInterest) -> String {
    [wishes_prefix(&i.product_id).as_str(), &i.customer_id].concat()
}

/// Where the version before [`product_key_part`] kept a product's wishes when its id
/// holds a `/` or `%`: `w/<product>/`, shared with other products. None otherwise.
fn legacy_wishes_prefix(product_id: &str) -> Option<String> {
    matches!(product_key_part(product_id), Cow::Owned(_)).then(|| format!("w/{product_id}/"))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Interest {
    viewed_at: Option<Millis>,
    wishlisted: bool,
}

/// How many updates sent on a process remembers (see `CatalogJoin::sent_on`).
const SENT_ON_REMEMBERED: usize = 100_000;

/// A hash of a record's bytes, within this process.
fn payload_hash(payload: &[u8]) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::default().hash_one(payload)
}

pub enum CatalogInput {
    Update(Box<CatalogUpdate>),
    Interest(Box<ProductInterest>),
    /// A catalog update read on another partition than its product's (the shop's feed
    /// keyed it otherwise, or a producer with another partitioner, such as Java's
    /// murmur2, wrote it): it is sent on, as read, to the product's partition, where
    /// the product's state and its audience are.
    Misrouted {
        product_id: String,
        occurred_at: Millis,
        payload: Vec<u8>,
    },
}

pub struct CatalogJoin {
    registry: SchemaRegistry,
    catalog_topic: String,
    interest_topic: String,
    occasions_topic: String,
    /// `kafka.partitions`: a product's state is on the partition of its id.
    partitions: i32,
    /// Catalog updates sent on to their product's partition.
    misrouted_forwarded: prometheus::IntCounter,
    /// Hashes of the updates this process sent on lately, and how often: one sent on
    /// twice and read on a wrong partition again is going round (the topic's partition
    /// count is not `kafka.partitions`, changed while running) and is dead-lettered
    /// instead of going round for ever. (Twice: the shop may send the same bytes
    /// again.) Checked in `decode`, which takes `&self`.
    sent_on: std::sync::Mutex<HashMap<u64, u8>>,
    /// The drops the price-drop scenarios ask for, in percent, smallest first.
    drop_thresholds: Vec<f64>,
    watches_stock: bool,
    /// Views of the current batch not written yet, per partition, by (product, day):
    /// customer -> latest view. Written at the commit (see `flush`).
    batch_views: HashMap<i32, BatchViews>,
    /// Each product's latest announcements as stored (`ProductState::news`), per
    /// partition, read once per product: so a view, about every other event, costs
    /// no read to find none. At most `NEWS_CACHED_PER_PARTITION` products each.
    news: HashMap<i32, HashMap<CompactString, Vec<News>>>,
    /// `profile.audience_per_commit`.
    audience_per_commit: usize,
    /// On the wall clock, a large audience is told in chunks over several commits.
    chunked: bool,
    /// Customers told of an announcement since the partition's last commit.
    told_since_commit: HashMap<i32, usize>,
}

impl CatalogJoin {
    pub fn new(config: &Config, registry: SchemaRegistry, metrics: &prometheus::Registry) -> Self {
        let enabled = |k| {
            config
                .scenarios
                .iter()
                .filter(move |s| s.enabled && s.kind == k)
        };
        CatalogJoin {
            registry,
            catalog_topic: config.topic(topics::CATALOG),
            interest_topic: config.topic(topics::PRODUCT_INTEREST),
            occasions_topic: config.topic(topics::PRODUCT_OCCASIONS),
            partitions: config.kafka.partitions,
            sent_on: std::sync::Mutex::new(HashMap::new()),
            misrouted_forwarded: kairos_core::metrics::counter(
                metrics,
                "kairos_catalog_updates_forwarded_total",
                "Catalog updates read on another partition than their product id's (keyed otherwise, or by a producer with another partitioner), sent on to it.",
            ),
            drop_thresholds: {
                let mut thresholds: Vec<f64> = enabled(ScenarioKind::PriceDrop)
                    .map(|s| s.min_drop())
                    .collect();
                thresholds.sort_by(f64::total_cmp);
                thresholds.dedup();
                thresholds
            },
            watches_stock: enabled(ScenarioKind::BackInStock).next().is_some(),
            batch_views: HashMap::new(),
            news: HashMap::new(),
            audience_per_commit: config.profile.audience_per_commit.max(1),
            chunked: config.clock.mode == ClockMode::Wall,
            told_since_commit: HashMap::new(),
        }
    }

    /// Tells `customer` of the `announced` news that reach them.
    fn tell(
        &mut self,
        ctx: &mut Ctx<'_>,
        product_id: &str,
        (customer, wishlisted): &Listener,
        announced: &[&News],
    ) {
        for news in announced {
            if news.kind == ProductOccasionKind::back_in_stock && !wishlisted {
                continue;
            }
            if *wishlisted && news.told_with_return(announced) {
                continue;
            }
            let occasion = news.occasion_for(product_id, customer);
            ctx.emit(&self.occasions_topic, customer, &occasion);
        }
        *self.told_since_commit.entry(ctx.partition).or_default() += 1;
    }

    /// How many more customers this commit tells.
    fn audience_left(&self, partition: i32) -> usize {
        let told = self.told_since_commit.get(&partition).copied().unwrap_or(0);
        self.audience_per_commit.saturating_sub(told)
    }

    /// Tells the `audience` of the `announced` news of `product_id` made by the update
    /// `event_id` at `at`: at once, if this commit has room for it (and always in
    /// event time, whose results must not depend on where commits fall), else in
    /// chunks over the next commits (see [`FAN_OUT`]).
    fn tell_audience(
        &mut self,
        ctx: &mut Ctx<'_>,
        product_id: &str,
        (event_id, at): (&str, Millis),
        audience: Vec<Listener>,
        announced: &[&News],
    ) -> anyhow::Result<()> {
        if !self.chunked || audience.len() <= self.audience_left(ctx.partition) {
            for listener in &audience {
                self.tell(ctx, product_id, listener, announced);
            }
            return Ok(());
        }
        let kinds: Vec<String> = announced.iter().map(|n| format!("{:?}", n.kind)).collect();
        let job = deterministic_id(&[product_id, event_id, &at.to_string(), &kinds.join(",")]);
        let job_key = format!("fo/{job}");
        if ctx.get::<FanOut>(&job_key)?.is_some() {
            // The same update read again (a feed's repeat): its telling is under way.
            return Ok(());
        }
        let chunks = audience.chunks(STORED_CHUNK.min(self.audience_per_commit));
        let count = chunks.len();
        for (n, chunk) in chunks.enumerate() {
            ctx.put(&chunk_key(&job_key, n), &chunk)?;
        }
        let fan_out = FanOut {
            product_id: product_id.to_string(),
            news: announced.iter().map(|n| (*n).clone()).collect(),
            chunks: u32::try_from(count).context("an audience of over 4 billion chunks")?,
            next: 0,
        };
        ctx.put(&job_key, &fan_out)?;
        ctx.schedule(&format!("{FAN_OUT}/{job}"), ctx.now(), &job_key)?;
        tracing::info!(
            product = product_id,
            customers = audience.len(),
            "an announcement's audience is told in chunks over the next commits"
        );
        Ok(())
    }

    /// Tells a fan-out's next chunks, as many as this commit has room for (one at
    /// least, if it told no one yet), of the announcements that still hold, at the
    /// price now (as late interest is told: sold out again since, or a drop whose price
    /// rose back, tells the rest nothing); arms the rest [`FAN_OUT_PAUSE`] later.
    fn tell_next_chunk(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let job_key: String = timer
            .decode()
            .with_context(|| format!("timer {} payload does not decode", timer.timer_id))?;
        let Some(mut job) = ctx.get::<FanOut>(&job_key)? else {
            return Ok(());
        };
        let holding: Vec<News> = (ctx.get::<ProductState>(&format!("p/{}", job.product_id))?)
            .map(|p| p.told_late())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| {
                (job.news.iter()).any(|made| made.kind == n.kind && made.event_id == n.event_id)
            })
            .collect();
        let announced: Vec<&News> = holding.iter().collect();
        while job.next < job.chunks && !announced.is_empty() {
            let key = chunk_key(&job_key, job.next as usize);
            let chunk: Vec<Listener> = ctx.get(&key)?.unwrap_or_default();
            let left = self.audience_left(ctx.partition);
            if left < self.audience_per_commit && chunk.len() > left {
                break;
            }
            for listener in &chunk {
                self.tell(ctx, &job.product_id, listener, &announced);
            }
            ctx.delete(&key);
            job.next += 1;
        }
        if job.next < job.chunks && !announced.is_empty() {
            ctx.put(&job_key, &job)?;
            ctx.schedule(&timer.timer_id, ctx.now() + FAN_OUT_PAUSE, &job_key)?;
        } else {
            for n in job.next..job.chunks {
                ctx.delete(&chunk_key(&job_key, n as usize));
            }
            ctx.delete(&job_key);
        }
        Ok(())
    }

    /// How often this process sent `payload` on lately (see `CatalogJoin::sent_on`).
    fn times_sent_on(&self, payload: &[u8]) -> u8 {
        let hash = payload_hash(payload);
        (self.sent_on.lock().ok())
            .and_then(|sent| sent.get(&hash).copied())
            .unwrap_or(0)
    }

    fn note_sent_on(&self, payload: &[u8]) {
        let hash = payload_hash(payload);
        if let Ok(mut sent) = self.sent_on.lock() {
            // Bounded: a loop comes back within seconds.
            if sent.len() >= SENT_ON_REMEMBERED {
                sent.clear();
            }
            let times = sent.entry(hash).or_insert(0);
            *times = times.saturating_add(1);
        }
    }

    /// Adds views gathered in the batch to the stored views of `product` on `day`: to
    /// the day's first value while it has room (or holds the customer already), else
    /// to the customer's overflow piece (see [`DAY_VIEWS_PER_VALUE`]).
    fn write_day_views(
        ctx: &mut Ctx<'_>,
        product_id: &str,
        day: i64,
        views: HashMap<String, Millis>,
    ) -> anyhow::Result<()> {
        let (key, mut stored) = Self::day_views(ctx, product_id, day, None)?;
        // In customer order, so which ones fill the first value is the same on replay.
        let mut views: Vec<(String, Millis)> = views.into_iter().collect();
        views.sort_unstable();
        let mut overflow: BTreeMap<u64, Vec<(String, Millis)>> = BTreeMap::new();
        for (customer, at) in views {
            if let Some(latest) = stored.get_mut(&customer) {
                *latest = (*latest).max(at);
            } else if stored.len() < DAY_VIEWS_PER_VALUE {
                stored.insert(customer, at);
            } else {
                let piece = 1 + kairos_core::ids::stable_hash(&customer) % DAY_VIEW_PIECES;
                overflow.entry(piece).or_default().push((customer, at));
            }
        }
        ctx.put(&key, &stored)?;
        for (piece, views) in overflow {
            let (key, mut stored) = Self::day_views(ctx, product_id, day, Some(piece))?;
            for (customer, at) in views {
                let latest = stored.entry(customer).or_insert(at);
                *latest = (*latest).max(at);
            }
            ctx.put(&key, &stored)?;
        }
        Ok(())
    }

    /// The key and stored views of `product_id` on `day` (its first value, or overflow
    /// `piece`); a new one gets its expiry timer.
    fn day_views(
        ctx: &mut Ctx<'_>,
        product_id: &str,
        day: i64,
        piece: Option<u64>,
    ) -> anyhow::Result<(String, DayViews)> {
        let (key, timer) = match piece {
            None => (
                day_views_key(product_id, day),
                format!("{DAY_VIEWS_EXPIRY}/{product_id}/{day}"),
            ),
            Some(piece) => (
                day_views_piece_key(product_id, day, piece),
                format!("{DAY_VIEWS_EXPIRY}/{product_id}/{day}.{piece:03}"),
            ),
        };
        let stored = ctx.get::<DayViews>(&key)?;
        if stored.is_none() {
            // The day's last view is read by drops until VIEW_INTEREST_DAYS after it.
            let expires = (day + 1 + VIEW_INTEREST_DAYS) * DAY;
            ctx.schedule(&timer, expires, &key)?;
        }
        Ok((key, stored.unwrap_or_default()))
    }

    fn apply_update(&mut self, ctx: &mut Ctx<'_>, u: &CatalogUpdate) -> anyhow::Result<()> {
        let key = format!("p/{}", u.product_id);
        let mut product: ProductState = ctx.get(&key)?.unwrap_or_default();
        // Per field, only what is newer than what the product holds applies.
        let newer = |set_at: Option<Millis>| set_at.is_none_or(|at| at <= u.occurred_at);
        let quoted = u.price.filter(|_| newer(product.price_at));
        // Feeds send 0 for "no price" or "price on request": as a price, it would be a
        // 100% drop told to the product's whole audience. It is no price, but the
        // newest word on it: an older update read later changes nothing.
        let price = quoted.filter(|p| *p > 0.0);
        let in_stock = u.in_stock.filter(|_| newer(product.stock_at));
        let mut occasions = Vec::new();
        // Read once: the window's highest and lowest price, and the prices a drop may
        // cross.
        let seen = product.window_prices(u.occurred_at);
        let window_high = seen.iter().copied().reduce(f64::max);
        let window_low = product.window_low(u.occurred_at, &seen);
        // The highest price since the last announced drop (within the window): steps
        // down add up to a drop worth announcing.
        let since_announced = match (product.reference_price.or(product.price), window_high) {
            (Some(reference), Some(high)) => Some(reference.min(high)),
            (reference, high) => reference.or(high),
        };
        let restocked = product.in_stock == Some(false) && in_stock == Some(true);
        // A drop is news only for a product one can buy: one while it is out of stock
        // waits and is told when it is back (a full row repeating the price too).
        let buyable = in_stock.or(product.in_stock) != Some(false);
        let checked = match restocked {
            true => price.or(product.price),
            false => price.filter(|new| product.price.is_none_or(|before| *new < before)),
        };
        // The lowest price of the 30 days before the price a drop would tell took
        // effect: this update's, or (a cut while sold out, told at the return) the one
        // held, set by an earlier update.
        let prior_low = match checked {
            Some(new) if product.price == Some(new) => product.low_before_price,
            _ => window_low,
        };
        let first_day = audience_first_day(u.occurred_at);
        let last_announced = (product.announced_price)
            .zip(product.announced_at)
            .filter(|(_, at)| at.div_euclid(DAY) >= first_day)
            .map(|(price, _)| price);
        if let (Some(new), true) = (checked, buyable) {
            let thresholds = &self.drop_thresholds;
            let min = thresholds.first().copied().unwrap_or(f64::INFINITY);
            let since = since_announced.map_or(0.0, |old| drop_percent(old, new));
            // Also news: a price some viewer may have seen in the window (each day's
            // highest and closing price, the latest prices replaced) that this one is a
            // scenario's threshold below and the last announcement was not. A customer
            // who viewed it at an
            // in-between price (100, 92 viewed, 89 told from 100, then 82) hears of 82,
            // 11% below what they saw, as a 30% scenario hears of 70 after 72 was told
            // from 100; a repricer's cents up and down cross no threshold, and read the
            // product's audience not again. The profile measures each customer.
            let crossed = || {
                seen.iter().copied().chain(since_announced).any(|old| {
                    thresholds.iter().any(|t| {
                        drop_percent(old, new) >= *t
                            && last_announced.is_none_or(|told| drop_percent(old, told) < *t)
                    })
                })
            };
            let drop = window_high.map_or(0.0, |high| drop_percent(high, new));
            if drop > 0.0 && (since >= min || crossed()) {
                occasions.push((ProductOccasionKind::price_drop, window_high, Some(new)));
            }
        }
        if self.watches_stock && restocked {
            // A drop told with the return carries its price from before: a wisher
            // hears of both in the one message (see `News::told_with_return`). A
            // return without one carries no old price (the message tells no drop).
            let dropped_from = occasions.first().and_then(|(_, old, _)| *old);
            occasions.push((
                ProductOccasionKind::back_in_stock,
                dropped_from,
                price.or(product.price),
            ));
        }
        if u.name.is_some() && newer(product.name_at) {
            product.name = u.name.clone();
            product.name_at = Some(u.occurred_at);
        }
        if quoted.is_some() {
            product.price_at = Some(u.occurred_at);
        }
        let announced = occasions
            .iter()
            .find(|(kind, _, _)| *kind == ProductOccasionKind::price_drop)
            .and_then(|(_, _, new)| *new);
        if let Some(new) = announced {
            product.announced_price = Some(new);
            product.announced_at = Some(u.occurred_at);
        }
        if let Some(new) = price {
            if product.price_days.is_empty() {
                // A row from before the days were kept: its price held until now (not
                // its reference, which may be months old).
                if let Some(before) = product.price {
                    product.record_price(before, u.occurred_at);
                }
            }
            if product.price != Some(new) {
                // (Nothing to note of a product without a price yet.)
                product.note_replaced(u.occurred_at);
                product.low_before_price = window_low;
            }
            product.price = Some(new);
            product.record_price(new, u.occurred_at);
            // An announced drop starts a new reference; a rise raises it.
            product.reference_price = Some(match since_announced {
                Some(r) if announced.is_none() => r.max(new),
                _ => new,
            });
        } else if let Some(told) = announced {
            // Told at the return to stock: the next drop is measured from here.
            product.reference_price = Some(told);
        }
        let stock_before = product.in_stock;
        if in_stock.is_some() {
            product.in_stock = in_stock;
            product.stock_at = Some(u.occurred_at);
        }
        let now_price = product.price;
        let told = product.news.len();
        product.news.retain(|n| n.still_holds(now_price));
        let mut followed = false;
        for n in product.news.iter_mut() {
            followed |= n.follow_price(now_price);
        }
        // News withdrawn or changed: the cached copy, which late interest is told
        // from, must say the same as the stored one (a restart reads that).
        let withdrawn = product.news.len() < told || followed;
        for (kind, old, new) in &occasions {
            product.news.retain(|n| n.kind != *kind);
            product.news.push(News {
                kind: *kind,
                event_id: u.event_id.clone(),
                occurred_at: u.occurred_at,
                old_price: *old,
                new_price: *new,
                product_name: product.name.clone(),
                // Only a drop states a prior price (a return told with one does).
                lowest_price: old.and(prior_low),
            });
        }
        ctx.put(&key, &product)?;
        if occasions.is_empty() && !withdrawn && product.in_stock == stock_before {
            return Ok(());
        }
        // Only a product cached already is brought up to date: one not cached is read
        // when interest in it comes (a catalog load of a million products must not
        // fill the cache past its bound).
        if let Some(cached) = self
            .news
            .get_mut(&ctx.partition)
            .and_then(|products| products.get_mut(u.product_id.as_str()))
        {
            *cached = product.told_late();
        }
        if occasions.is_empty() {
            return Ok(());
        }
        // Only this product's audience is read.
        let fresh_after = u.occurred_at - VIEW_INTEREST_DAYS * DAY;
        let mut audience: std::collections::BTreeMap<String, Interest> = Default::default();
        let viewed = |audience: &mut BTreeMap<String, Interest>, customer, at| {
            let seen = &mut audience.entry(customer).or_default().viewed_at;
            *seen = (*seen).max(Some(at));
        };
        // This batch's views of the product count too: written out first.
        let batch_days = self
            .batch_views
            .get_mut(&ctx.partition)
            .and_then(|batch| batch.remove(u.product_id.as_str()));
        for (day, views) in batch_days.into_iter().flatten() {
            Self::write_day_views(ctx, &u.product_id, day, views)?;
        }
        let by_day = format!("vd/{}/", u.product_id);
        for (key, views) in ctx.scan::<DayViews>(&by_day)? {
            // Fixed-width days only (a product id with a slash could share the prefix).
            let suffix = key.strip_prefix(&by_day).unwrap_or_default();
            let Some(day) = day_of_views_key(suffix) else {
                continue;
            };
            if day < first_day {
                ctx.delete(&key);
                continue;
            }
            for (customer, at) in views {
                // A view dated after the change saw the new price (the update read
                // late): as for interest that reaches the join late (`News::reaches`).
                // The whole first day of the window counts: its entry holds the day's
                // first view, and a later one that day may be within the window (the
                // profile knows the last one, and skips a customer outside it).
                if at < u.occurred_at {
                    viewed(&mut audience, customer, at);
                }
            }
        }
        // Views indexed one key per customer by earlier versions.
        let legacy_views = format!("v/{}/", u.product_id);
        for (key, viewed_at) in ctx.scan::<Millis>(&legacy_views)? {
            if viewed_at < fresh_after {
                ctx.delete(&key);
                continue;
            }
            if viewed_at >= u.occurred_at {
                continue;
            }
            let customer = key.strip_prefix(&legacy_views).unwrap_or_default();
            viewed(&mut audience, customer.to_string(), viewed_at);
        }
        let legacy_wishes = legacy_wishes_prefix(&u.product_id);
        for wishes in std::iter::once(wishes_prefix(&u.product_id)).chain(legacy_wishes) {
            for (key, entry) in ctx.scan::<WishEntry>(&wishes)? {
                let customer = key.strip_prefix(&wishes).unwrap_or_default().to_string();
                if matches!(&entry, WishEntry::Customer(c) if *c != customer) {
                    // A legacy row of another product whose id is this one's, a slash
                    // and more (product `a/b`'s `w/a/b/c` under `w/a/`).
                    continue;
                }
                audience.entry(customer).or_default().wishlisted = true;
            }
        }
        // This update's announcements (its kinds: a feed may give one event id to
        // several updates of a product).
        let announced: Vec<&News> = product
            .news
            .iter()
            .filter(|n| occasions.iter().any(|(kind, _, _)| *kind == n.kind))
            .collect();
        // Only those the announcements reach: a viewer of a return to stock alone
        // hears nothing.
        let wishers_only = announced
            .iter()
            .all(|n| n.kind == ProductOccasionKind::back_in_stock);
        let audience: Vec<Listener> = (audience.into_iter())
            .filter(|(_, interest)| interest.wishlisted || !wishers_only)
            .map(|(customer, interest)| (customer, interest.wishlisted))
            .collect();
        self.tell_audience(
            ctx,
            &u.product_id,
            (&u.event_id, u.occurred_at),
            audience,
            &announced,
        )
    }

    /// Tells a customer whose interest arrives after an announcement it was shown
    /// before of that announcement, under the occasion id the announcement gave it (so
    /// one who heard already hears once: the profile drops a repeated id).
    fn announce_late(&mut self, ctx: &mut Ctx<'_>, i: &ProductInterest) -> anyhow::Result<()> {
        let products = self.news.entry(ctx.partition).or_default();
        if !products.contains_key(i.product_id.as_str()) {
            if products.len() >= NEWS_CACHED_PER_PARTITION {
                // A cache: read again as needed, memory bounded whatever the catalog.
                products.clear();
            }
            let key = format!("p/{}", i.product_id);
            let news = ctx
                .get::<ProductState>(&key)?
                .map(|p| p.told_late())
                .unwrap_or_default();
            products.insert(CompactString::from(i.product_id.as_str()), news);
        }
        let wished = i.kind == InterestKind::wishlisted;
        let reached: Vec<&News> = (products.get(i.product_id.as_str()).into_iter().flatten())
            .filter(|n| n.reaches(i.occurred_at, wished))
            .collect();
        for n in reached
            .iter()
            .filter(|n| !(wished && n.told_with_return(&reached)))
        {
            let occasion = n.occasion_for(&i.product_id, &i.customer_id);
            ctx.emit(&self.occasions_topic, &i.customer_id, &occasion);
        }
        Ok(())
    }

    fn apply_interest(&mut self, ctx: &mut Ctx<'_>, i: &ProductInterest) -> anyhow::Result<()> {
        if i.kind != InterestKind::unwishlisted {
            self.announce_late(ctx, i)?;
        }
        match i.kind {
            // No read: a batch's views gather in memory until it commits (`flush`).
            InterestKind::viewed => {
                let day = i.occurred_at.div_euclid(DAY);
                let latest = self
                    .batch_views
                    .entry(ctx.partition)
                    .or_default()
                    .entry(CompactString::from(i.product_id.as_str()))
                    .or_default()
                    .entry(day)
                    .or_default()
                    .entry(i.customer_id.clone())
                    .or_insert(i.occurred_at);
                *latest = (*latest).max(i.occurred_at);
                Ok(())
            }
            // Wishlists are rare: one key per customer, a blind write.
            InterestKind::wishlisted => {
                ctx.put(&wish_key(i), &WishEntry::Customer(i.customer_id.clone()))
            }
            InterestKind::unwishlisted => {
                ctx.delete(&wish_key(i));
                if let Some(legacy) = legacy_wishes_prefix(&i.product_id) {
                    // The legacy key may be another product's wish: only this
                    // customer's row of this product goes (a `true` row cannot tell).
                    let key = [legacy.as_str(), &i.customer_id].concat();
                    if !matches!(ctx.get::<WishEntry>(&key)?, Some(WishEntry::Customer(c)) if c != i.customer_id)
                    {
                        ctx.delete(&key);
                    }
                }
                Ok(())
            }
        }
    }
}

impl Processor for CatalogJoin {
    type Input = CatalogInput;

    fn name(&self) -> &str {
        "catalog"
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.catalog_topic.clone(), self.interest_topic.clone()]
    }

    /// The catalog comes from the shop's systems, whose clocks may be wrong: an update
    /// too far ahead would become the product's latest state for good.
    fn is_raw_input(&self, topic: &str) -> bool {
        topic == self.catalog_topic
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.occasions_topic.clone(), self.catalog_topic.clone()]
    }

    fn decode(&self, record: &Record<'_>) -> Result<CatalogInput, Rejection> {
        if record.topic == self.catalog_topic {
            let u: CatalogUpdate =
                decode_input(record.payload, schemas::catalog_update(), &self.registry)?;
            kairos_core::input::check_id(format_args!("event_id"), &u.event_id)?;
            kairos_core::input::check_id(format_args!("product_id"), &u.product_id)?;
            for (field, value) in [("name", &u.name), ("category", &u.category)] {
                let max = kairos_core::input::MAX_TEXT_BYTES;
                kairos_core::input::check_text(format_args!("{field}"), value.as_deref(), max)?;
            }
            kairos_core::input::check_amount("price", u.price)?;
            let own = partition_for(u.product_id.as_bytes(), self.partitions);
            if own != record.partition {
                if self.times_sent_on(record.payload) >= 2 {
                    return Err(Rejection::new(
                        DeadLetterReason::invalid_field,
                        format!(
                            "product_id: the update of {:?} came back to partition {} after it was sent on twice to partition {own}, its product id's: the catalog topic's partition count is not kafka.partitions ({})",
                            u.product_id, record.partition, self.partitions
                        ),
                    ));
                }
                return Ok(CatalogInput::Misrouted {
                    occurred_at: u.occurred_at,
                    product_id: u.product_id,
                    payload: record.payload.to_vec(),
                });
            }
            Ok(CatalogInput::Update(Box::new(u)))
        } else {
            Ok(CatalogInput::Interest(Box::new(decode_internal(
                record.payload,
            )?)))
        }
    }

    fn event_time(&self, input: &CatalogInput) -> Option<Millis> {
        Some(match input {
            CatalogInput::Update(u) => u.occurred_at,
            CatalogInput::Interest(i) => i.occurred_at,
            CatalogInput::Misrouted { occurred_at, .. } => *occurred_at,
        })
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: CatalogInput) -> anyhow::Result<()> {
        match input {
            CatalogInput::Update(u) => self.apply_update(ctx, &u),
            CatalogInput::Interest(i) => self.apply_interest(ctx, &i),
            CatalogInput::Misrouted {
                product_id,
                payload,
                ..
            } => {
                // Through the outbox, with this record's offset (a copy published
                // again after a crash applies as once: updates apply by their time).
                let topic = self.catalog_topic.clone();
                self.note_sent_on(&payload);
                ctx.emit_encoded(&topic, &product_id, payload);
                self.misrouted_forwarded.inc();
                Ok(())
            }
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        if timer.timer_id.starts_with(&format!("{FAN_OUT}/")) {
            return self.tell_next_chunk(ctx, timer);
        }
        if timer.timer_id.starts_with(&format!("{DAY_VIEWS_EXPIRY}/")) {
            let key: String = timer
                .decode()
                .with_context(|| format!("timer {} payload does not decode", timer.timer_id))?;
            // Views of the day written since (late ones) move no timer: the day is
            // past the window all the same.
            ctx.delete(&key);
        }
        Ok(())
    }

    fn flush(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        self.told_since_commit.remove(&ctx.partition);
        if let Some(batch) = self.batch_views.get_mut(&ctx.partition) {
            for (product_id, days) in batch.drain() {
                for (day, views) in days {
                    Self::write_day_views(ctx, &product_id, day, views)?;
                }
            }
        }
        Ok(())
    }

    fn on_partition_closed(&mut self, partition: i32) {
        self.told_since_commit.remove(&partition);
        self.batch_views.remove(&partition);
        self.news.remove(&partition);
    }
}

/// Runs the catalog join until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<kairos_core::admin::AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let registry = SchemaRegistry::new(config.schema_registry.url.clone());
    let processor = CatalogJoin::new(&config, registry.clone(), &admin.registry);
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_core::encoding::{encode_internal, encode_state};
    use kairos_core::replay::Replayer;
    use kairos_core::store::{Pending, StoreFactory};
    use kairos_core::time::{HOUR, MINUTE};

    const T0: Millis = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    /// A feed that gives one event id to a whole run's updates still makes one
    /// occasion per product: the customer hears of each drop.
    #[test]
    fn occasions_of_two_products_under_one_event_id_are_two() {
        let drop = ProductOccasionKind::price_drop;
        assert_ne!(
            occasion_id("run-42", "p1", "c1", drop),
            occasion_id("run-42", "p2", "c1", drop)
        );
        assert_eq!(
            occasion_id("run-42", "p1", "c1", drop),
            occasion_id("run-42", "p1", "c1", drop)
        );
    }

    fn catalog_join(dir: &std::path::Path) -> (Config, Replayer<CatalogJoin>) {
        catalog_join_on(dir, 1)
    }

    /// The join over `partitions` partitions.
    fn catalog_join_on(dir: &std::path::Path, partitions: i32) -> (Config, Replayer<CatalogJoin>) {
        let config = Config::from_text(
            std::path::Path::new("test.toml"),
            &format!(
                r#"
[kafka]
partitions = {partitions}
[state]
max_batch_records = 1000
[clock]
mode = "event"
[[scenarios]]
name = "price_drop"
kind = "price_drop"
category = "trigger"
channels = ["email"]
template = "price_drop"
min_drop_percent = 10.0
"#
            ),
            &[("KAIROS__STATE__DIR".into(), dir.display().to_string())],
        )
        .unwrap();
        let metrics = prometheus::Registry::new();
        let join = CatalogJoin::new(&config, SchemaRegistry::new(None), &metrics);
        let replayer = Replayer::new(join, &config, &metrics).unwrap();
        (config, replayer)
    }

    fn interest(customer: &str, product: &str, at: Millis, kind: InterestKind) -> Vec<u8> {
        encode_internal(&ProductInterest {
            interest_id: format!("{customer}-{product}-{at}-{kind:?}"),
            customer_id: customer.into(),
            product_id: product.into(),
            kind,
            price_seen: Some(100.0),
            occurred_at: at,
        })
    }

    fn view(customer: &str, product: &str, at: Millis) -> Vec<u8> {
        interest(customer, product, at, InterestKind::viewed)
    }

    /// A catalog update of p1's stock alone.
    fn stock(event_id: &str, in_stock: bool, at: Millis) -> Vec<u8> {
        serde_json::to_vec(
            &serde_json::json!({"event_id": event_id, "product_id": "p1",
            "in_stock": in_stock, "occurred_at": at}),
        )
        .unwrap()
    }

    fn price(product: &str, event_id: &str, price: f64, at: Millis) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "event_id": event_id,
            "product_id": product,
            "price": price,
            "occurred_at": at,
        }))
        .unwrap()
    }

    /// Pushes `record` keyed by product p1 and commits: the outputs of both.
    fn push_p1(
        r: &mut Replayer<CatalogJoin>,
        topic: &str,
        record: Vec<u8>,
    ) -> Vec<kairos_core::store::OutboxEntry> {
        let mut out = r.push(topic, b"p1", &record).unwrap();
        out.extend(r.commit().unwrap());
        out
    }

    /// The product occasions among a join's `outputs`.
    fn occasions(outputs: &[kairos_core::store::OutboxEntry]) -> Vec<ProductOccasion> {
        (outputs.iter())
            .filter(|e| e.topic.ends_with(topics::PRODUCT_OCCASIONS))
            .map(|e| serde_json::from_slice::<ProductOccasion>(&e.payload).unwrap())
            .collect()
    }

    /// Customers told of a price drop of `product`, in order.
    fn told(outputs: &[kairos_core::store::OutboxEntry], product: &str) -> Vec<String> {
        let mut customers: Vec<String> = occasions(outputs)
            .into_iter()
            .filter(|o| o.product_id == product && o.kind == ProductOccasionKind::price_drop)
            .map(|o| o.customer_id)
            .collect();
        customers.sort();
        customers
    }

    /// A product viewed by more customers in a day than one value keeps: the rest go
    /// to overflow pieces, none of them large, every viewer hears of the drop, and the
    /// pieces go with the day.
    #[test]
    fn a_popular_product_s_day_of_views_is_kept_in_bounded_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let viewers = DAY_VIEWS_PER_VALUE + 1_000;
        let customer = |n: usize| format!("c{n:05}");
        r.push(&catalog, b"p1", &price("p1", "u1", 100.0, T0))
            .unwrap();
        // Two batches: the first fills more than the first value.
        for n in 0..viewers {
            let at = T0 + HOUR + n as Millis;
            r.push(&interest, b"p1", &view(&customer(n), "p1", at))
                .unwrap();
            if n == DAY_VIEWS_PER_VALUE + 500 {
                r.commit().unwrap();
            }
        }
        // A viewer in an overflow piece views again: the piece keeps the latest view.
        let again = customer(viewers - 1);
        r.push(&interest, b"p1", &view(&again, "p1", T0 + 2 * HOUR))
            .unwrap();
        r.commit().unwrap();
        let day = T0.div_euclid(DAY);
        let store = r.engine.store(0).unwrap();
        let values: Vec<(String, DayViews)> = store
            .scan_state(b"vd/p1/")
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8(k).unwrap();
                (
                    key,
                    kairos_core::encoding::decode_state::<DayViews>(&v).unwrap(),
                )
            })
            .collect();
        let first = &values
            .iter()
            .find(|(k, _)| *k == day_views_key("p1", day))
            .expect("the day's first value")
            .1;
        assert_eq!(first.len(), DAY_VIEWS_PER_VALUE);
        assert!(values.len() > 2, "overflow pieces: {}", values.len());
        assert!(values.iter().all(|(_, v)| v.len() <= DAY_VIEWS_PER_VALUE));
        let total: usize = values.iter().map(|(_, v)| v.len()).sum();
        assert_eq!(total, viewers, "each viewer once");
        let latest = values.iter().find_map(|(_, v)| v.get(&again)).copied();
        assert_eq!(latest, Some(T0 + 2 * HOUR));
        // Every viewer hears of the drop.
        let out = r
            .push(&catalog, b"p1", &price("p1", "u2", 80.0, T0 + 3 * HOUR))
            .unwrap();
        let mut out = out;
        out.extend(r.commit().unwrap());
        assert_eq!(told(&out, "p1").len(), viewers);
        // Past the interest window the timers delete every piece.
        r.advance_to(T0 + (VIEW_INTEREST_DAYS + 2) * DAY).unwrap();
        r.commit().unwrap();
        let store = r.engine.store(0).unwrap();
        assert!(store.scan_state(b"vd/p1/").unwrap().is_empty());
    }

    /// A price of 0 ("price on request") is no price: nobody is told of a 100% drop,
    /// and a real drop later is measured from the price before it.
    #[test]
    fn a_zero_price_is_no_price_and_no_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        push(&catalog, price("p1", "u1", 100.0, T0));
        push(&interest, view("a", "p1", T0 + HOUR));
        let out = push(&catalog, price("p1", "u2", 0.0, T0 + 2 * HOUR));
        assert!(told(&out, "p1").is_empty(), "told of a zero price");
        // An older update read after it changes nothing.
        let out = push(&catalog, price("p1", "u-late", 85.0, T0 + 90 * MINUTE));
        assert!(
            told(&out, "p1").is_empty(),
            "told of an update older than the 0"
        );
        let out = push(&catalog, price("p1", "u3", 80.0, T0 + 3 * HOUR));
        assert_eq!(told(&out, "p1"), ["a"]);
    }

    /// A catalog update read after views dated after it (the feed lagging): those
    /// viewers saw the new price and are not told; one who viewed before is.
    #[test]
    fn a_view_dated_after_the_drop_is_not_told_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        push(&catalog, price("p1", "u1", 100.0, T0));
        push(&interest, view("before", "p1", T0 + HOUR));
        push(&interest, view("after", "p1", T0 + 3 * HOUR));
        let out = push(&catalog, price("p1", "u2", 80.0, T0 + 2 * HOUR));
        assert_eq!(told(&out, "p1"), ["before"]);
    }

    /// A catalog update keyed otherwise than by its product id (a feed keyed by SKU
    /// row, or written by a producer with another partitioner) reaches a partition
    /// without the product's state or audience: it is sent on, as read, to the
    /// product's partition, and the viewer there hears of the drop.
    #[test]
    fn a_catalog_update_on_another_partition_than_its_product_s_is_sent_on_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join_on(dir.path(), 4);
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let wrong_key = (0..100)
            .map(|n| format!("row-{n}"))
            .find(|k| partition_for(k.as_bytes(), 4) != partition_for(b"p1", 4))
            .unwrap();
        // What the broker would deliver: the records pushed, then what they sent on.
        let mut deliver = |key: &[u8], topic: &str, record: Vec<u8>| {
            let mut out = r.push(topic, key, &record).unwrap();
            out.extend(r.commit().unwrap());
            let sent_on: Vec<_> = out
                .iter()
                .filter(|e| e.topic == catalog)
                .map(|e| (e.key.clone(), e.payload.clone()))
                .collect();
            for (key, payload) in sent_on {
                assert_eq!(key, b"p1", "sent on keyed by its product id");
                assert_eq!(payload, record, "sent on as read");
                out.extend(r.push(&catalog, &key, &payload).unwrap());
                out.extend(r.commit().unwrap());
            }
            out
        };
        let out = deliver(wrong_key.as_bytes(), &catalog, price("p1", "u1", 100.0, T0));
        assert_eq!(
            out.iter().filter(|e| e.topic == catalog).count(),
            1,
            "the update is sent on once (not again from the product's partition)"
        );
        deliver(b"p1", &interest, view("a", "p1", T0 + HOUR));
        let out = deliver(
            wrong_key.as_bytes(),
            &catalog,
            price("p1", "u2", 80.0, T0 + 2 * HOUR),
        );
        assert_eq!(told(&out, "p1"), ["a"]);
    }

    /// An update sent on that comes back to a wrong partition (the catalog topic's
    /// partition count changed under a running join) is dead-lettered, not sent round
    /// again and again.
    #[test]
    fn an_update_sent_on_that_comes_back_misrouted_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join_on(dir.path(), 4);
        let catalog = config.topic(topics::CATALOG);
        let wrong = (0..4).find(|p| *p != partition_for(b"p1", 4)).unwrap();
        let record = price("p1", "u1", 100.0, T0);
        let mut out = r
            .push_to_partition(&catalog, wrong, b"p1", &record)
            .unwrap();
        out.extend(r.commit().unwrap());
        assert_eq!(out.iter().filter(|e| e.topic == catalog).count(), 1);
        // Back on the wrong partition: sent on once more (the shop may send the same
        // bytes again), then, back again, dead-lettered.
        let mut out = r
            .push_to_partition(&catalog, wrong, b"p1", &record)
            .unwrap();
        out.extend(r.commit().unwrap());
        assert_eq!(out.iter().filter(|e| e.topic == catalog).count(), 1);
        let mut out = r
            .push_to_partition(&catalog, wrong, b"p1", &record)
            .unwrap();
        out.extend(r.commit().unwrap());
        assert!(out.iter().all(|e| e.topic != catalog), "sent round again");
        let letters: Vec<_> = out
            .iter()
            .filter(|e| e.topic == config.topic(topics::DEAD_LETTER))
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .collect();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert!(letters[0].contains("partition count"), "{}", letters[0]);
    }

    /// The name follows the newest update too: one older, read later, leaves it.
    #[test]
    fn an_older_update_read_later_keeps_the_newer_name() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let named = |event_id: &str, name: &str, price: f64, at: Millis| {
            serde_json::to_vec(&serde_json::json!({
                "event_id": event_id, "product_id": "p1", "name": name,
                "price": price, "occurred_at": at,
            }))
            .unwrap()
        };
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        push(&catalog, named("u2", "Kettle Pro", 100.0, T0 + HOUR));
        push(&catalog, named("u1", "Kettle", 100.0, T0));
        push(&interest, view("a", "p1", T0 + 2 * HOUR));
        let out = push(&catalog, price("p1", "u3", 80.0, T0 + 3 * HOUR));
        let names: Vec<Option<String>> = (occasions(&out).into_iter())
            .map(|o| o.product_name)
            .collect();
        assert_eq!(names, [Some("Kettle Pro".to_string())]);
    }

    #[test]
    fn day_of_views_key_reads_days_and_pieces_only() {
        assert_eq!(day_of_views_key("0000020000"), Some(20_000));
        assert_eq!(day_of_views_key("0000020000.017"), Some(20_000));
        assert_eq!(day_of_views_key("b/0000020000"), None);
        assert_eq!(day_of_views_key("0000020000.x17"), None);
        assert_eq!(day_of_views_key("0000020000/0000020001"), None);
    }

    #[test]
    fn a_day_of_views_is_deleted_once_past_the_interest_window_without_a_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        for (customer, at) in [("a", T0 + HOUR), ("b", T0 + 2 * HOUR), ("c", T0 + DAY)] {
            r.push(&interest, b"p3", &view(customer, "p3", at)).unwrap();
        }
        r.commit().unwrap();
        let stored = |r: &Replayer<CatalogJoin>, t: Millis| {
            r.engine
                .store(0)
                .unwrap()
                .get(
                    &Pending::default(),
                    day_views_key("p3", t.div_euclid(DAY)).as_bytes(),
                )
                .unwrap()
                .is_some()
        };
        assert!(stored(&r, T0) && stored(&r, T0 + DAY));
        // Day 0 is read by drops until 30 days after its end; day 1 a day longer.
        r.advance_to(T0 + (VIEW_INTEREST_DAYS + 1) * DAY - 1)
            .unwrap();
        assert!(stored(&r, T0), "still within the window");
        r.advance_to(T0 + (VIEW_INTEREST_DAYS + 1) * DAY).unwrap();
        r.commit().unwrap();
        assert!(!stored(&r, T0), "past the window");
        assert!(stored(&r, T0 + DAY));
    }

    /// Writes `rows` (key, encoded value) to partition 0 of the join's store in `dir`,
    /// as an earlier version left them.
    fn stored_before(dir: &std::path::Path, rows: &[(String, Vec<u8>)]) {
        let factory = StoreFactory::new(&dir.join("catalog"), 1 << 20).unwrap();
        let mut store = factory.open(0).unwrap();
        let mut pending = Pending::default();
        for (key, value) in rows {
            store.put(&mut pending, key.as_bytes(), value.clone());
        }
        store.commit(&mut pending, None).unwrap();
    }

    fn wish(customer: &str, product: &str, at: Millis) -> Vec<u8> {
        interest(customer, product, at, InterestKind::wishlisted)
    }

    /// A feed of full rows repeats the price with the stock: the drop held while sold
    /// out is told at the return all the same. A repricer's cents up and down, and a
    /// step much smaller than the threshold below the last announcement, read the
    /// audience not again.
    #[test]
    fn a_full_row_return_tells_the_held_drop_and_price_flaps_tell_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let row = |id: &str, price: f64, in_stock: bool, at: Millis| {
            serde_json::to_vec(&serde_json::json!({"event_id": id, "product_id": "p1",
                "price": price, "in_stock": in_stock, "occurred_at": at}))
            .unwrap()
        };
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        push(&catalog, row("f1", 100.0, true, T0));
        push(&interest, view("c", "p1", T0 + HOUR));
        assert!(told(&push(&catalog, row("f2", 80.0, false, T0 + 2 * HOUR)), "p1").is_empty());
        assert_eq!(
            told(&push(&catalog, row("f3", 80.0, true, T0 + 3 * HOUR)), "p1"),
            ["c"]
        );
        for (i, price) in [80.5, 80.0, 80.5, 80.0, 79.0].into_iter().enumerate() {
            let id = format!("flap-{i}");
            let at = T0 + (4 + i as Millis) * HOUR;
            let out = push(&catalog, row(&id, price, true, at));
            assert!(told(&out, "p1").is_empty(), "{price}");
        }
        // 25% below the window's 100, but whoever saw 100 was told of 80, and 75 is
        // 10% below no price in the window that 80 was not: news to no one.
        let out = push(&catalog, row("f9", 75.0, true, T0 + 10 * HOUR));
        assert!(told(&out, "p1").is_empty(), "75");
        // 10% below the 80 the window held since: read again.
        let out = push(&catalog, row("f10", 72.0, true, T0 + 11 * HOUR));
        assert_eq!(told(&out, "p1"), ["c"]);
    }

    /// A viewer at an in-between price never announced (95, after 100) is in the
    /// audience of the drop that is 10% below what they saw (85.5), though it is less
    /// than 10% below the drop announced since (89, told from 100).
    #[test]
    fn a_drop_below_an_in_between_price_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        push(&catalog, price("p1", "m0", 100.0, T0));
        push(&interest, view("early", "p1", T0 + HOUR));
        assert!(told(
            &push(&catalog, price("p1", "m1", 95.0, T0 + 2 * HOUR)),
            "p1"
        )
        .is_empty());
        push(&interest, view("v", "p1", T0 + 3 * HOUR));
        let out = push(&catalog, price("p1", "m2", 89.0, T0 + 4 * HOUR));
        assert_eq!(told(&out, "p1"), ["early", "v"]);
        let out = push(&catalog, price("p1", "m3", 85.5, T0 + 5 * HOUR));
        assert_eq!(told(&out, "p1"), ["early", "v"], "10% below the 95 v saw");
    }

    /// A drop while the product is out of stock is no news to a viewer who cannot buy
    /// it: it is told, from the price before, when the product is back.
    #[test]
    fn a_drop_while_out_of_stock_is_told_when_the_product_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        push(&catalog, price("p1", "u1", 100.0, T0));
        push(&interest, view("c", "p1", T0 + HOUR));
        push(&catalog, stock("u2", false, T0 + 2 * HOUR));
        let out = push(&catalog, price("p1", "u3", 80.0, T0 + 3 * HOUR));
        assert!(told(&out, "p1").is_empty(), "out of stock");
        let out = push(&catalog, stock("u4", true, T0 + 4 * HOUR));
        assert_eq!(told(&out, "p1"), ["c"]);
        let occasion = occasions(&out).into_iter().next().unwrap();
        assert_eq!(
            (occasion.old_price, occasion.new_price),
            (Some(100.0), Some(80.0))
        );
        // 24% below the window's highest price, but whoever saw 100 was told of 80,
        // and 76 is 5% below it: news to no one.
        let out = push(&catalog, price("p1", "u5", 76.0, T0 + 5 * HOUR));
        assert!(told(&out, "p1").is_empty(), "76");
        // A rise is no drop, and a step down to 92 is 8% below the window's highest
        // price (100): news to no one.
        let out = push(&catalog, price("p1", "u6", 95.0, T0 + 6 * HOUR));
        assert!(told(&out, "p1").is_empty(), "a rise");
        let out = push(&catalog, price("p1", "u7", 92.0, T0 + 7 * HOUR));
        assert!(told(&out, "p1").is_empty(), "8% below the window's 100");
    }

    /// A drop states the lowest price in effect in the 30 days before it (the prior
    /// price of the EU's Omnibus directive): a sale at 80 a few days before a drop
    /// from 100 to 90 is it, and no longer once it left the window.
    #[test]
    fn a_drop_states_the_lowest_price_of_the_30_days_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        let stated = |out: &[kairos_core::store::OutboxEntry]| -> Vec<_> {
            (occasions(out).into_iter())
                .map(|o| (o.old_price, o.new_price, o.lowest_price))
                .collect()
        };
        push(&catalog, price("p1", "u1", 100.0, T0));
        push(&interest, view("c", "p1", T0 + HOUR));
        let out = push(&catalog, price("p1", "u2", 80.0, T0 + DAY));
        assert_eq!(stated(&out), [(Some(100.0), Some(80.0), Some(100.0))]);
        push(&catalog, price("p1", "u3", 100.0, T0 + 2 * DAY));
        let out = push(&catalog, price("p1", "u4", 90.0, T0 + 5 * DAY));
        assert_eq!(stated(&out), [(Some(100.0), Some(90.0), Some(80.0))]);
        // Forty days on, 90 has held for the whole window.
        push(&interest, view("c", "p1", T0 + 39 * DAY));
        let out = push(&catalog, price("p1", "u5", 81.0, T0 + 40 * DAY));
        assert_eq!(stated(&out), [(Some(90.0), Some(81.0), Some(90.0))]);
    }

    /// A cut while sold out is told at the return, stating the lowest price of the
    /// 30 days before the cut, not the cut price itself; a day's lowest price counts
    /// though more prices were replaced since than the product keeps.
    #[test]
    fn the_prior_price_is_the_lowest_before_the_cut_whenever_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        let lowest = |out: &[kairos_core::store::OutboxEntry]| -> Vec<Option<f64>> {
            (occasions(out).into_iter())
                .map(|o| o.lowest_price)
                .collect()
        };
        push(&catalog, price("p1", "u1", 100.0, T0));
        push(&interest, view("c", "p1", T0 + HOUR));
        push(&catalog, stock("u2", false, T0 + DAY));
        push(&catalog, price("p1", "u3", 80.0, T0 + 2 * DAY));
        let out = push(&catalog, stock("u4", true, T0 + 3 * DAY));
        assert_eq!(lowest(&out), [Some(100.0)]);
        // An hour at 60 on day 4, then 40 prices of 100 and more replaced since.
        push(&catalog, price("p1", "u5", 60.0, T0 + 4 * DAY));
        for i in 0..40 {
            let at = T0 + 4 * DAY + (i + 1) * HOUR / 2;
            push(
                &catalog,
                price("p1", &format!("r{i}"), 100.0 + (i % 2) as f64, at),
            );
        }
        push(&interest, view("c", "p1", T0 + 6 * DAY));
        let out = push(&catalog, price("p1", "u6", 85.0, T0 + 7 * DAY));
        assert_eq!(lowest(&out), [Some(60.0)]);
    }

    /// A catalog update caches nothing of a product no interest asked about (a load of
    /// every product would fill the cache past its bound); interest read later still
    /// hears of the drop, from the stored product.
    #[test]
    fn catalog_updates_cache_no_news_of_products_nobody_asked_about() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut push = |topic: &str, record: Vec<u8>| push_p1(&mut r, topic, record);
        push(&catalog, price("p1", "u1", 100.0, T0));
        push(&catalog, price("p1", "u2", 80.0, T0 + 2 * HOUR));
        let cached = |r: &Replayer<CatalogJoin>| {
            r.engine
                .processor
                .news
                .values()
                .map(HashMap::len)
                .sum::<usize>()
        };
        assert_eq!(cached(&r), 0, "updates cache nothing");
        let out = push_p1(&mut r, &interest, view("c", "p1", T0 + HOUR));
        assert_eq!(told(&out, "p1"), ["c"], "read from the stored product");
        assert_eq!(cached(&r), 1);
        // Once cached, a later drop keeps the cache up to date.
        push_p1(&mut r, &catalog, price("p1", "u3", 60.0, T0 + 3 * HOUR));
        let out = push_p1(
            &mut r,
            &interest,
            view("d", "p1", T0 + 2 * HOUR + 30 * MINUTE),
        );
        assert_eq!(told(&out, "p1"), ["d"], "told of the drop to 60");
    }

    /// The profile publishes a batch's interest when it commits, so a view or wish
    /// from before a drop can reach the join after it: the customer is told, under
    /// the drop's occasion id, whether the join read the drop in this run or before a
    /// restart. Interest dated after the drop, or a view older than the audience
    /// window, is not told; a repeat is told under the same id.
    #[test]
    fn interest_read_after_a_drop_it_came_before_is_told_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let drop_at = T0 + 2 * HOUR;
        r.push(&catalog, b"p1", &price("p1", "u1", 100.0, T0))
            .unwrap();
        // Read before the drop (so the join holds the product's news, none yet).
        r.push(&interest, b"p1", &view("early", "p1", T0)).unwrap();
        r.commit().unwrap();
        let mut out = r
            .push(&catalog, b"p1", &price("p1", "u2", 80.0, drop_at))
            .unwrap();
        out.extend(r.commit().unwrap());
        assert_eq!(told(&out, "p1"), ["early"]);
        let late = |r: &mut Replayer<CatalogJoin>, interests: &[Vec<u8>]| {
            let mut out = Vec::new();
            for i in interests {
                out.extend(r.push(&interest, b"p1", i).unwrap());
            }
            out.extend(r.commit().unwrap());
            out
        };
        let out = late(
            &mut r,
            &[
                view("before", "p1", drop_at - HOUR),
                view("after", "p1", drop_at + HOUR),
                view("too-old", "p1", drop_at - (VIEW_INTEREST_DAYS + 1) * DAY),
            ],
        );
        assert_eq!(told(&out, "p1"), ["before"]);
        let ids = |out: &[kairos_core::store::OutboxEntry]| -> Vec<String> {
            occasions(out).into_iter().map(|o| o.occasion_id).collect()
        };
        let kind = ProductOccasionKind::price_drop;
        assert_eq!(ids(&out), [occasion_id("u2", "p1", "before", kind)]);
        drop(r);
        // After a restart the announcement is read from the product's state.
        let (_, mut r) = catalog_join(dir.path());
        let out = late(
            &mut r,
            &[
                view("before", "p1", drop_at - HOUR),
                wish("wisher", "p1", drop_at - (VIEW_INTEREST_DAYS + 5) * DAY),
            ],
        );
        assert_eq!(told(&out, "p1"), ["before", "wisher"]);
        assert_eq!(ids(&out)[0], occasion_id("u2", "p1", "before", kind));
    }

    /// Product `a/b`'s wishes share the key prefix `w/a/` with product `a`'s: its
    /// customers are not product `a`'s audience. A wish row written before (`true`)
    /// still counts.
    #[test]
    fn a_product_id_with_a_slash_keeps_its_wishes_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        stored_before(
            dir.path(),
            &[("w/a/old".into(), encode_state(&true).unwrap())],
        );
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        r.push(&interest, b"a/b", &wish("c", "a/b", T0)).unwrap();
        r.push(&interest, b"a", &wish("d", "a", T0)).unwrap();
        r.push(&catalog, b"a", &price("a", "u1", 100.0, T0 + HOUR))
            .unwrap();
        r.commit().unwrap();
        let mut out = r
            .push(&catalog, b"a", &price("a", "u2", 50.0, T0 + 2 * HOUR))
            .unwrap();
        out.extend(r.commit().unwrap());
        assert_eq!(told(&out, "a"), ["d", "old"]);
    }

    /// Product `a` wished by customer `b/c` and product `a/b` wished by `c` are two
    /// wishes: taking one back leaves the other, and each drop reaches its own. A row
    /// of `a/b` written before the ids were escaped still counts and is taken back.
    #[test]
    fn wishes_whose_product_and_customer_ids_hold_slashes_keep_apart() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = encode_state(&WishEntry::Customer("legacy".into())).unwrap();
        stored_before(dir.path(), &[("w/a/b/legacy".into(), legacy)]);
        let unwish = |customer: &str, product: &str| {
            interest(customer, product, T0 + 1, InterestKind::unwishlisted)
        };
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        r.push(&interest, b"a", &wish("b/c", "a", T0)).unwrap();
        r.push(&interest, b"a/b", &wish("c", "a/b", T0)).unwrap();
        r.push(&interest, b"a/b", &wish("d", "a/b", T0)).unwrap();
        r.push(&catalog, b"a", &price("a", "u1", 100.0, T0 + HOUR))
            .unwrap();
        r.push(&catalog, b"a/b", &price("a/b", "v1", 100.0, T0 + HOUR))
            .unwrap();
        r.commit().unwrap();
        let drops = |r: &mut Replayer<CatalogJoin>, n: i64| {
            let at = T0 + (2 + n) * HOUR;
            let amount = 80.0 - 20.0 * n as f64;
            let mut out = r
                .push(&catalog, b"a", &price("a", &format!("u{n}"), amount, at))
                .unwrap();
            out.extend(
                r.push(
                    &catalog,
                    b"a/b",
                    &price("a/b", &format!("v{n}"), amount, at),
                )
                .unwrap(),
            );
            out.extend(r.commit().unwrap());
            (told(&out, "a"), told(&out, "a/b"))
        };
        assert_eq!(
            drops(&mut r, 0),
            (
                vec!["b/c".to_string()],
                vec!["c".into(), "d".into(), "legacy".into()]
            )
        );
        r.push(&interest, b"a/b", &unwish("c", "a/b")).unwrap();
        r.push(&interest, b"a/b", &unwish("legacy", "a/b")).unwrap();
        r.commit().unwrap();
        assert_eq!(
            drops(&mut r, 1),
            (vec!["b/c".to_string()], vec!["d".to_string()])
        );
    }

    /// A product keeps the prices of the window's days and the day before it, however
    /// long its feed runs; the window's highest price counts the one carried into it.
    #[test]
    fn a_product_keeps_its_prices_for_the_window_only() {
        let mut product = ProductState::default();
        for day in 0..100 {
            let price = 200.0 - day as f64;
            product.record_price(price, T0 + day * DAY + HOUR);
            product.record_price(price + 0.5, T0 + day * DAY + 2 * HOUR);
            product.price = Some(price + 0.5);
        }
        assert!(product.price_days.len() <= VIEW_INTEREST_DAYS as usize + 2);
        // At day 100: the window starts on day 70, when the price was 130 and 130.5;
        // day 69 closed at 131.5, which held at the window's start.
        let high = |p: &ProductState, at| p.window_prices(at).into_iter().reduce(f64::max);
        assert_eq!(high(&product, T0 + 100 * DAY), Some(131.5));
        let flat = ProductState {
            price: Some(50.0),
            reference_price: Some(60.0),
            ..ProductState::default()
        };
        assert_eq!(high(&flat, T0), Some(60.0), "a row from before the days");
    }

    #[test]
    fn product_rows_written_before_the_reference_price_still_read() {
        let row = rmp_serde::to_vec(&(Some("Kettle"), Some(100.0), Some(true))).expect("encode");
        let read: ProductState = rmp_serde::from_slice(&row).expect("an older row reads");
        assert_eq!((read.price, read.reference_price), (Some(100.0), None));
    }

    #[test]
    fn a_price_drop_reaches_the_views_of_the_last_30_days_indexed_per_day_or_per_customer() {
        let dir = tempfile::tempdir().unwrap();
        let drop_at = T0 + 12 * DAY;
        let fresh_after = drop_at - VIEW_INTEREST_DAYS * DAY;
        // Views indexed one key per customer by an earlier version.
        let legacy = [("legacy-fresh", T0), ("legacy-stale", fresh_after - 1)]
            .map(|(customer, at)| (format!("v/p1/{customer}"), encode_state(&at).unwrap()));
        stored_before(dir.path(), &legacy);
        let (config, mut r) = catalog_join(dir.path());
        let interest = config.topic(topics::PRODUCT_INTEREST);
        let catalog = config.topic(topics::CATALOG);
        let mut out = r
            .push(&catalog, b"p1", &price("p1", "u1", 100.0, T0))
            .unwrap();
        for (customer, product, at) in [
            ("too-old", "p1", fresh_after - HOUR),
            ("just-in", "p1", fresh_after + HOUR),
            ("came-back", "p1", fresh_after - 5 * DAY),
            ("came-back", "p1", T0 + 10 * DAY),
            ("other-product", "p2", T0 + 10 * DAY),
        ] {
            out.extend(
                r.push(&interest, product.as_bytes(), &view(customer, product, at))
                    .unwrap(),
            );
        }
        out.extend(r.commit().unwrap());
        // A view earlier in the same batch as the drop, not committed yet, counts too.
        out.extend(
            r.push(&interest, b"p1", &view("same-batch", "p1", drop_at - HOUR))
                .unwrap(),
        );
        out.extend(
            r.push(&catalog, b"p1", &price("p1", "u2", 80.0, drop_at))
                .unwrap(),
        );
        out.extend(r.commit().unwrap());
        assert_eq!(
            told(&out, "p1"),
            ["came-back", "just-in", "legacy-fresh", "same-batch"]
        );
        // One key per product and day; days and legacy keys past the window are gone.
        let store = r.engine.store(0).unwrap();
        let stored = |key: &str| {
            store
                .get(&Pending::default(), key.as_bytes())
                .unwrap()
                .map(|v| kairos_core::encoding::decode_state::<DayViews>(&v).unwrap())
        };
        let day = |t: Millis| day_views_key("p1", t.div_euclid(DAY));
        assert_eq!(
            stored(&day(fresh_after - HOUR)),
            None,
            "an old day is deleted"
        );
        assert_eq!(stored(&day(fresh_after - 5 * DAY)), None);
        let kept = stored(&day(drop_at - HOUR)).expect("the drop's day");
        assert_eq!(kept.get("same-batch"), Some(&(drop_at - HOUR)));
        assert!(store
            .get(&Pending::default(), b"v/p1/legacy-stale")
            .unwrap()
            .is_none());
        assert!(store
            .get(&Pending::default(), b"v/p1/legacy-fresh")
            .unwrap()
            .is_some());
        // No per-customer view keys are written any more.
        assert!(store
            .get(&Pending::default(), b"v/p1/just-in")
            .unwrap()
            .is_none());
    }
}
