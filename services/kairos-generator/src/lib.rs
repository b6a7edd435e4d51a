//! `kairos generate`: realistic shop traffic for demos, load tests and benchmarks.
//!
//! Customers browse in sessions on the site or the app: page and product views
//! (popular products viewed far more than the long tail), searches, carts (about one
//! session in seven), checkouts and purchases (about 3% of sessions buy), with
//! log-normally skewed prices. Some visitors register (with contacts and per-channel
//! consent), some shop in physical stores and show a loyalty card at the till, and a
//! few bring a till sale back (a refund receipt). Orders move on in the shop's back
//! office: shipped, delivered, a few cancelled or returned. Registered customers
//! sometimes browse logged out on another device and log in on the way, change their
//! consents, move to another time zone or take out a plan with an end date; app
//! sessions carry their device's id. Wishes are made and some taken back; with
//! `generator.catalog_change_share`, the shop drops and restores prices and runs out
//! of products and restocks them (the catalog topic).

use std::collections::VecDeque;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kairos_core::config::{topics, Config, GeneratorConfig};
use kairos_core::contracts::{
    CatalogUpdate, Channel, ConsentChange, CustomerEvent, EventType, LineItem, OfflineReceipt,
    Order, OrderStatus, Platform, Product, ProfileUpdate, ReceiptKind,
};
use kairos_core::ids::deterministic_id;
use kairos_core::time::{wall_now, Millis, SECOND};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Zipf};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Where a customer event goes.
pub use kairos_core::input::Source;

/// The topic a generated record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Events(Source),
    Catalog,
}

impl Stream {
    /// The topic's name without the configured prefix.
    pub fn topic(self) -> &'static str {
        match self {
            Stream::Events(Source::Site) => topics::SITE_EVENTS,
            Stream::Events(Source::App) => topics::APP_EVENTS,
            Stream::Events(Source::Offline) => topics::OFFLINE_EVENTS,
            Stream::Catalog => topics::CATALOG,
        }
    }
}

/// One generated record, ready to publish.
#[derive(Debug, Clone)]
pub struct GeneratedEvent {
    pub stream: Stream,
    pub key: String,
    pub payload: Vec<u8>,
}

struct CatalogItem {
    id: String,
    name: String,
    category: &'static str,
    price: f64,
    /// The price the shop comes back to after a sale.
    list_price: f64,
    in_stock: bool,
}

const CATEGORIES: [&str; 8] = [
    "shoes",
    "dresses",
    "jeans",
    "bags",
    "outerwear",
    "accessories",
    "sportswear",
    "kids",
];
const TIME_ZONES: [&str; 6] = [
    "Europe/Berlin",
    "Europe/London",
    "Europe/Moscow",
    "America/New_York",
    "Asia/Dubai",
    "Asia/Almaty",
];
const FIRST_NAMES: [&str; 10] = [
    "Anna", "Maria", "Olga", "Elena", "Ivan", "Sergey", "Laura", "James", "Sofia", "Omar",
];

/// Funnel rates, per session.
const P_ADD_TO_CART: f64 = 0.15;
const P_CHECKOUT_GIVEN_CART: f64 = 0.45;
const P_PURCHASE_GIVEN_CHECKOUT: f64 = 0.50;
const P_REGISTER: f64 = 0.25;
const P_SEARCH: f64 = 0.30;
const P_WISHLIST: f64 = 0.04;
/// The chance that a session of a customer with wishes takes one back.
const P_UNWISH: f64 = 0.05;
/// Wishes remembered per customer (the oldest goes), to take back.
const WISHES_KEPT: usize = 5;
/// The chance that a turn of the traffic is the back office moving an open order on
/// (shipped, delivered, cancelled or returned) rather than a visit, while orders are
/// open: each order takes two or three such turns, and about 3% of visits buy.
const P_ORDER_UPDATE: f64 = 0.08;
/// Of orders placed, cancelled before shipping; of those delivered, returned.
const P_CANCEL: f64 = 0.04;
const P_RETURN: f64 = 0.06;
/// Orders followed at once at most (the oldest is dropped beyond).
const OPEN_ORDERS_KEPT: usize = 5_000;
/// The chance that a till visit is a refund of an earlier till sale.
const P_REFUND: f64 = 0.03;
/// Till sales remembered to refund.
const TILL_SALES_KEPT: usize = 1_000;
/// The chance that a registered customer's visit starts logged out, on another
/// device or a cleared browser, and logs in on the way.
const P_LOGGED_OUT: f64 = 0.10;
/// The chance that a registered customer's visit changes their profile: a consent
/// given or withdrawn, a move to another time zone, a plan with an end date.
const P_PROFILE_CHANGE: f64 = 0.03;
/// Zipf's exponent of visits over customers (ranked by how often they come): the most
/// frequent fifth makes about half the sessions, and the most frequent customer of
/// 20,000 under 1% of them (of a million, about 0.2%).
const VISIT_SKEW: f64 = 0.6;

/// An order the back office has yet to move on.
struct OpenOrder {
    /// How the purchase named its buyer: (customer id, anonymous id).
    buyer: (Option<String>, Option<String>),
    order_id: String,
    total: f64,
    status: OrderStatus,
}

/// A till sale that may come back.
struct TillSale {
    receipt: OfflineReceipt,
    key: String,
}

pub struct TrafficModel {
    rng: StdRng,
    open_orders: VecDeque<OpenOrder>,
    till_sales: VecDeque<TillSale>,
    /// The cookie a registered customer's current visit goes by until it logs in.
    logged_out_as: Option<String>,
    customers: u64,
    visitors: Zipf<f64>,
    offline_share: f64,
    catalog: Vec<CatalogItem>,
    /// The share of sessions followed by a catalog change.
    catalog_change_share: f64,
    /// Whether the whole catalog went out (before the first change: a change is news
    /// only against a price the catalog join knows).
    catalog_published: bool,
    registered: HashSet<u64>,
    /// Each customer's latest wishes, to take back.
    wishes: HashMap<u64, Vec<usize>>,
    /// The share of recent sessions whose customer was registered: see
    /// [`TrafficModel::receipt_probability`].
    registered_share: f64,
    /// Names this run in every event, order and receipt id: see [`TrafficModel::live`].
    run: String,
    seq: u64,
}

impl TrafficModel {
    /// The same traffic, with the same ids, for the same configuration: files for
    /// benchmarks and tests.
    pub fn new(cfg: &GeneratorConfig) -> Self {
        Self::seeded(cfg, cfg.seed, String::new())
    }

    /// Traffic of its own for one live run (`run` is unique per run, e.g. the start
    /// time): a second run against the same engine would otherwise send the same event
    /// and order ids, which the profile drops as producer retries, and the very same
    /// sessions again.
    pub fn live(cfg: &GeneratorConfig, run: u64) -> Self {
        Self::seeded(cfg, cfg.seed ^ run, run.to_string())
    }

    fn seeded(cfg: &GeneratorConfig, seed: u64, run: String) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let prices = LogNormal::new(3.4, 0.8).unwrap_or_else(|_| unreachable_lognormal());
        let catalog = (0..500)
            .map(|i| {
                let category = CATEGORIES[i % CATEGORIES.len()];
                let price = (prices.sample(&mut rng) * 100.0_f64).round() / 100.0 + 1.0;
                CatalogItem {
                    id: format!("p{i:04}"),
                    name: format!("{category} #{i}"),
                    category,
                    price,
                    list_price: price,
                    in_stock: true,
                }
            })
            .collect();
        let customers = cfg.customers.max(1);
        TrafficModel {
            rng,
            open_orders: VecDeque::new(),
            till_sales: VecDeque::new(),
            logged_out_as: None,
            customers,
            visitors: Zipf::new(customers, VISIT_SKEW)
                .expect("Zipf's law over at least one customer with a positive exponent"),
            offline_share: cfg.offline_share.clamp(0.0, 0.95),
            catalog,
            catalog_change_share: cfg.catalog_change_share.clamp(0.0, 1.0),
            catalog_published: false,
            registered: HashSet::new(),
            wishes: HashMap::new(),
            registered_share: 0.0,
            run,
            seq: 0,
        }
    }

    fn event_id(&mut self) -> String {
        self.seq += 1;
        let seq = self.seq.to_string();
        if self.run.is_empty() {
            deterministic_id(&["generator", &seq])
        } else {
            deterministic_id(&["generator", &self.run, &seq])
        }
    }

    /// The chance that a registered customer's session is a till sale, so that till
    /// sales are `offline_share` of all purchases: online ones come from the funnel
    /// of the other sessions, and only registered customers (a loyalty card) have
    /// receipts, a share of sessions that grows as the base registers.
    fn receipt_probability(&self) -> f64 {
        const P_ONLINE_PURCHASE: f64 =
            P_ADD_TO_CART * P_CHECKOUT_GIVEN_CART * P_PURCHASE_GIVEN_CHECKOUT;
        let odds = self.offline_share / (1.0 - self.offline_share);
        (odds * P_ONLINE_PURCHASE / self.registered_share.max(0.05)).min(1.0)
    }

    /// A customer index skewed towards a core of frequent visitors: see
    /// `VISIT_SKEW`.
    fn pick_customer(&mut self) -> u64 {
        (self.visitors.sample(&mut self.rng) as u64).clamp(1, self.customers) - 1
    }

    /// A product index skewed towards bestsellers.
    fn pick_product(&mut self) -> usize {
        let u: f64 = self.rng.gen();
        ((u * u) * self.catalog.len() as f64) as usize % self.catalog.len()
    }

    fn product(&self, i: usize) -> Product {
        let c = &self.catalog[i];
        Product {
            product_id: c.id.clone(),
            name: Some(c.name.clone()),
            category: Some(c.category.to_string()),
            price: Some(c.price),
        }
    }

    fn line_item(&self, i: usize, quantity: i32) -> LineItem {
        let c = &self.catalog[i];
        LineItem {
            product_id: c.id.clone(),
            name: Some(c.name.clone()),
            category: Some(c.category.to_string()),
            quantity,
            unit_price: c.price,
        }
    }

    fn base_event(
        &mut self,
        t: EventType,
        customer: u64,
        at: Millis,
        p: Platform,
    ) -> CustomerEvent {
        let known = self.registered.contains(&customer) && self.logged_out_as.is_none();
        let anonymous = match &self.logged_out_as {
            Some(cookie) => Some(cookie.clone()),
            None => (!known).then(|| format!("anon-{customer:06}")),
        };
        CustomerEvent {
            platform: Some(p),
            customer_id: known.then(|| customer_id(customer)),
            anonymous_id: anonymous,
            // The app's install id: the same for the customer's phone every visit.
            device_id: match p {
                Platform::web => None,
                Platform::ios => Some(format!("ios-{customer:06}")),
                Platform::android => Some(format!("android-{customer:06}")),
            },
            ..self.blank_event(t, at)
        }
    }

    /// An event of type `t` at `at` with a new id and nothing else set.
    fn blank_event(&mut self, t: EventType, at: Millis) -> CustomerEvent {
        CustomerEvent {
            event_id: self.event_id(),
            event_type: t,
            occurred_at: at,
            platform: None,
            customer_id: None,
            anonymous_id: None,
            device_id: None,
            session_id: None,
            email: None,
            phone: None,
            loyalty_card: None,
            page_url: None,
            search_query: None,
            product: None,
            items: Vec::new(),
            order: None,
            consent: None,
            profile: None,
            interaction: None,
        }
    }

    /// One visit: a handful to a few dozen events, the last at `now` (or, now and
    /// then, the back office moving an order on, one event at `now`).
    pub fn session(&mut self, now: Millis) -> Vec<GeneratedEvent> {
        if !self.open_orders.is_empty() && self.rng.gen_bool(P_ORDER_UPDATE) {
            if let Some(update) = self.order_update(now) {
                return vec![update];
            }
        }
        let customer = self.pick_customer();
        let platform = match self.rng.gen_range(0..10) {
            0..=5 => Platform::web,
            6..=7 => Platform::ios,
            _ => Platform::android,
        };
        let source = if platform == Platform::web {
            Source::Site
        } else {
            Source::App
        };
        let registered = self.registered.contains(&customer);
        // Over about the last thousand sessions: the share keeps growing.
        self.registered_share += (f64::from(u8::from(registered)) - self.registered_share) / 1000.0;
        if registered && self.rng.gen_bool(self.receipt_probability()) {
            if !self.till_sales.is_empty() && self.rng.gen_bool(P_REFUND) {
                if let Some(refund) = self.refund(now) {
                    return vec![refund];
                }
            }
            return vec![self.receipt(customer, now)];
        }
        self.logged_out_as = (registered && self.rng.gen_bool(P_LOGGED_OUT))
            .then(|| format!("anon-{customer:06}-{}", self.rng.gen_range(1..4)));
        let session_id = self.event_id();
        let mut events = Vec::new();
        // Events of a session are 2 to 15 s apart, timed from its start here and moved
        // below so that its last one happens at `now`.
        let clock = std::cell::Cell::new(0);
        let mut push = |model: &mut Self, mut e: CustomerEvent| {
            e.session_id = Some(session_id.clone());
            clock.set(clock.get() + model.rng.gen_range(2..15) * SECOND);
            e.occurred_at = clock.get();
            events.push(e);
        };
        let at = 0;
        if platform != Platform::web {
            let e = self.base_event(EventType::app_open, customer, at, platform);
            push(self, e);
        }
        if !self.registered.contains(&customer) && self.rng.gen_bool(P_REGISTER) {
            self.registered.insert(customer);
            let e = self.registration(customer, at, platform);
            push(self, e);
        }
        for _ in 0..self.rng.gen_range(1..4) {
            let mut e = self.base_event(EventType::page_view, customer, at, platform);
            e.page_url = Some(format!(
                "https://shop.example/{}",
                CATEGORIES[self.rng.gen_range(0..8)]
            ));
            push(self, e);
        }
        if let Some(cookie) = self.logged_out_as.take() {
            // Logs in: the cookie's events so far are the customer's.
            let mut e = self.base_event(EventType::login, customer, at, platform);
            e.anonymous_id = Some(cookie);
            e.email = Some(format!("{}@example.com", customer_id(customer)));
            push(self, e);
        }
        if registered && self.rng.gen_bool(P_PROFILE_CHANGE) {
            let e = self.profile_change(customer, at, platform, now);
            push(self, e);
        }
        if self.rng.gen_bool(P_SEARCH) {
            let mut e = self.base_event(EventType::search, customer, at, platform);
            e.search_query = Some(CATEGORIES[self.rng.gen_range(0..8)].to_string());
            push(self, e);
        }
        let mut viewed = Vec::new();
        for _ in 0..self.rng.gen_range(1..6) {
            let i = self.pick_product();
            viewed.push(i);
            let mut e = self.base_event(EventType::product_view, customer, at, platform);
            e.product = Some(self.product(i));
            push(self, e);
        }
        if self.rng.gen_bool(P_WISHLIST) {
            let mut e = self.base_event(EventType::wishlist_add, customer, at, platform);
            e.product = Some(self.product(viewed[0]));
            push(self, e);
            let wishes = self.wishes.entry(customer).or_default();
            wishes.retain(|w| *w != viewed[0]);
            if wishes.len() == WISHES_KEPT {
                wishes.remove(0);
            }
            wishes.push(viewed[0]);
        } else if self.wishes.contains_key(&customer) && self.rng.gen_bool(P_UNWISH) {
            let taken_back = self.wishes.get_mut(&customer).and_then(Vec::pop);
            if self.wishes.get(&customer).is_some_and(Vec::is_empty) {
                self.wishes.remove(&customer);
            }
            if let Some(i) = taken_back {
                let mut e = self.base_event(EventType::wishlist_remove, customer, at, platform);
                e.product = Some(self.product(i));
                push(self, e);
            }
        }
        if self.rng.gen_bool(P_ADD_TO_CART) {
            let in_cart: Vec<usize> = viewed
                .iter()
                .take(self.rng.gen_range(1..3))
                .copied()
                .collect();
            for &i in &in_cart {
                let mut e = self.base_event(EventType::add_to_cart, customer, at, platform);
                e.product = Some(self.product(i));
                push(self, e);
            }
            if self.rng.gen_bool(P_CHECKOUT_GIVEN_CART) {
                let mut e = self.base_event(EventType::checkout_started, customer, at, platform);
                e.items = in_cart.iter().map(|&i| self.line_item(i, 1)).collect();
                push(self, e);
                if self.rng.gen_bool(P_PURCHASE_GIVEN_CHECKOUT) {
                    let items: Vec<LineItem> =
                        in_cart.iter().map(|&i| self.line_item(i, 1)).collect();
                    let total = items.iter().map(|i| i.unit_price).sum::<f64>();
                    let mut e = self.base_event(EventType::purchase, customer, at, platform);
                    let order_id = self.event_id();
                    let total = (total * 100.0).round() / 100.0;
                    e.order = Some(Order {
                        order_id: order_id.clone(),
                        total: Some(total),
                        currency: Some("EUR".into()),
                        status: Some(OrderStatus::placed),
                    });
                    e.items = items;
                    if self.open_orders.len() == OPEN_ORDERS_KEPT {
                        self.open_orders.pop_front();
                    }
                    self.open_orders.push_back(OpenOrder {
                        buyer: (e.customer_id.clone(), e.anonymous_id.clone()),
                        order_id,
                        total,
                        status: OrderStatus::placed,
                    });
                    push(self, e);
                }
            }
        }
        let shift = now - clock.get();
        let mut session: Vec<GeneratedEvent> = events
            .into_iter()
            .map(|mut e| {
                e.occurred_at += shift;
                GeneratedEvent {
                    stream: Stream::Events(source),
                    // The profile's own key: without identity resolution the
                    // profile reads these topics as keyed.
                    key: e.customer_key().unwrap_or_default(),
                    payload: serde_json::to_vec(&e).unwrap_or_default(),
                }
            })
            .collect();
        if self.catalog_change_share > 0.0 && !self.catalog_published {
            // The shop's feed: every product with its price, as a shop publishes its
            // catalog before it changes it.
            self.catalog_published = true;
            let feed: Vec<GeneratedEvent> = (0..self.catalog.len())
                .map(|i| self.catalog_record(i, now, |u, c| u.price = Some(c.price)))
                .collect();
            session.splice(0..0, feed);
        }
        if self.catalog_change_share > 0.0 && self.rng.gen_bool(self.catalog_change_share) {
            session.push(self.catalog_change(now));
        }
        session
    }

    /// A catalog update of product `i` at `at`, its fields set by `fill`.
    fn catalog_record(
        &mut self,
        i: usize,
        at: Millis,
        fill: impl FnOnce(&mut CatalogUpdate, &CatalogItem),
    ) -> GeneratedEvent {
        let event_id = self.event_id();
        let item = &self.catalog[i];
        let mut update = CatalogUpdate {
            event_id,
            occurred_at: at,
            product_id: item.id.clone(),
            name: Some(item.name.clone()),
            category: Some(item.category.to_string()),
            price: None,
            in_stock: None,
        };
        fill(&mut update, item);
        GeneratedEvent {
            stream: Stream::Catalog,
            key: update.product_id.clone(),
            payload: serde_json::to_vec(&update).unwrap_or_default(),
        }
    }

    /// A change the shop makes to a product (bestsellers most often): a sale of 10 to
    /// 30% off, the list price back after one, the product sold out, or back in stock.
    fn catalog_change(&mut self, now: Millis) -> GeneratedEvent {
        let i = self.pick_product();
        let cut = self.rng.gen_range(0.70..0.90);
        let sold_out = self.rng.gen_bool(0.3);
        let item = &mut self.catalog[i];
        let (price, in_stock) = if !item.in_stock {
            item.in_stock = true;
            (None, Some(true))
        } else if sold_out {
            item.in_stock = false;
            (None, Some(false))
        } else {
            item.price = if item.price < item.list_price {
                item.list_price
            } else {
                (item.list_price * cut * 100.0).round() / 100.0
            };
            (Some(item.price), None)
        };
        self.catalog_record(i, now, |u, _| {
            u.price = price;
            u.in_stock = in_stock;
        })
    }

    /// The back office moves the oldest open order on, as an `order_status` event at
    /// `now`: placed to shipped (a few cancelled), shipped to delivered, delivered
    /// to returned for a few; an order not done yet waits for its next turn.
    fn order_update(&mut self, now: Millis) -> Option<GeneratedEvent> {
        let mut order = self.open_orders.pop_front()?;
        order.status = match order.status {
            OrderStatus::placed if self.rng.gen_bool(P_CANCEL) => OrderStatus::cancelled,
            OrderStatus::placed => OrderStatus::shipped,
            OrderStatus::shipped => OrderStatus::delivered,
            OrderStatus::delivered if self.rng.gen_bool(P_RETURN) => OrderStatus::returned,
            // Delivered and kept: nothing more to tell.
            _ => return None,
        };
        let (customer_id, anonymous_id) = order.buyer.clone();
        if customer_id.is_none() && anonymous_id.is_none() {
            return None;
        }
        let e = CustomerEvent {
            customer_id,
            anonymous_id,
            order: Some(Order {
                order_id: order.order_id.clone(),
                total: Some(order.total),
                currency: Some("EUR".into()),
                status: Some(order.status),
            }),
            ..self.blank_event(EventType::order_status, now)
        };
        if matches!(order.status, OrderStatus::shipped | OrderStatus::delivered) {
            self.open_orders.push_back(order);
        }
        Some(GeneratedEvent {
            stream: Stream::Events(Source::Site),
            key: e.customer_key().unwrap_or_default(),
            payload: serde_json::to_vec(&e).unwrap_or_default(),
        })
    }

    /// A refund receipt for a recent till sale, at the till that sold it: the whole
    /// amount, or half of it (part of the basket back).
    fn refund(&mut self, now: Millis) -> Option<GeneratedEvent> {
        let i = self.rng.gen_range(0..self.till_sales.len());
        let sale = self.till_sales.remove(i)?;
        let share = if self.rng.gen_bool(0.7) { 1.0 } else { 0.5 };
        let receipt = OfflineReceipt {
            event_id: self.event_id(),
            occurred_at: now,
            receipt_id: self.event_id(),
            kind: ReceiptKind::refund,
            total: (sale.receipt.total * share * 100.0).round() / 100.0,
            ..sale.receipt
        };
        Some(GeneratedEvent {
            stream: Stream::Events(Source::Offline),
            key: sale.key,
            payload: serde_json::to_vec(&receipt).unwrap_or_default(),
        })
    }

    /// A registered customer changes their profile: a consent given (SMS, push) or
    /// e-mail withdrawn, a move to another time zone, or a plan that ends in one to
    /// two months.
    fn profile_change(
        &mut self,
        customer: u64,
        at: Millis,
        platform: Platform,
        now: Millis,
    ) -> CustomerEvent {
        match self.rng.gen_range(0..10) {
            0..=3 => {
                let mut e = self.base_event(EventType::consent_change, customer, at, platform);
                let channel = if platform == Platform::web {
                    Channel::sms
                } else {
                    Channel::push
                };
                e.consent = Some(ConsentChange {
                    channel,
                    granted: true,
                });
                e
            }
            4..=5 => {
                let mut e = self.base_event(EventType::consent_change, customer, at, platform);
                e.consent = Some(ConsentChange {
                    channel: Channel::email,
                    granted: false,
                });
                e
            }
            6..=7 => {
                let mut e = self.base_event(EventType::profile_update, customer, at, platform);
                let tz = TIME_ZONES[self.rng.gen_range(0..TIME_ZONES.len())];
                e.profile = Some(ProfileUpdate {
                    time_zone: Some(tz.to_string()),
                    ..Default::default()
                });
                e
            }
            _ => {
                let mut e = self.base_event(EventType::profile_update, customer, at, platform);
                let days = self.rng.gen_range(30..60);
                e.profile = Some(ProfileUpdate {
                    subscription_ends_at: Some(now + days * kairos_core::time::DAY),
                    ..Default::default()
                });
                e
            }
        }
    }

    fn registration(&mut self, customer: u64, at: Millis, platform: Platform) -> CustomerEvent {
        let mut e = self.base_event(EventType::registration, customer, at, platform);
        let tz = TIME_ZONES[self.rng.gen_range(0..TIME_ZONES.len())];
        e.customer_id = Some(customer_id(customer));
        e.anonymous_id = Some(format!("anon-{customer:06}"));
        e.email = Some(format!("{}@example.com", customer_id(customer)));
        e.phone = Some(format!("+49151{customer:08}"));
        e.profile = Some(ProfileUpdate {
            first_name: Some(FIRST_NAMES[(customer % 10) as usize].to_string()),
            time_zone: Some(tz.to_string()),
            birthday: Some(format!(
                "{}-{:02}-{:02}",
                1960 + customer % 45,
                1 + customer % 12,
                1 + customer % 28
            )),
            push_token: (platform != Platform::web).then(|| format!("tok-{customer}")),
            ..Default::default()
        });
        // Most shoppers opt in to e-mail at sign-up; fewer to push or SMS.
        let channel = if self.rng.gen_bool(0.8) {
            Channel::email
        } else if platform != Platform::web {
            Channel::push
        } else {
            Channel::sms
        };
        e.consent = Some(ConsentChange {
            channel,
            granted: true,
        });
        e
    }

    fn receipt(&mut self, customer: u64, now: Millis) -> GeneratedEvent {
        let n = self.rng.gen_range(1..4);
        let items: Vec<LineItem> = (0..n)
            .map(|_| {
                let i = self.pick_product();
                self.line_item(i, 1)
            })
            .collect();
        let total = (items.iter().map(|i| i.unit_price).sum::<f64>() * 100.0).round() / 100.0;
        let r = OfflineReceipt {
            event_id: self.event_id(),
            occurred_at: now,
            receipt_id: self.event_id(),
            kind: ReceiptKind::sale,
            store_id: format!("store-{:02}", self.rng.gen_range(1..40)),
            customer_id: None,
            loyalty_card: None,
            phone: None,
            items,
            total,
            currency: "EUR".into(),
        };
        // Most tills know the customer; some only scan the loyalty card, a few take the
        // phone number as the customer says it (the identity processor resolves both).
        let mut r = r;
        match self.rng.gen_range(0..10) {
            0..=5 => {
                r.customer_id = Some(customer_id(customer));
                r.loyalty_card = Some(format!("LC{customer:08}"));
            }
            6..=8 => r.loyalty_card = Some(format!("LC{customer:08}")),
            _ => r.phone = Some(format!("0151 {customer:08}")),
        }
        // The profile's own key (`card:…`, `phone:…`), as for site events.
        let key = r.customer_key().unwrap_or_default();
        let payload = serde_json::to_vec(&r).unwrap_or_default();
        if self.till_sales.len() == TILL_SALES_KEPT {
            self.till_sales.pop_front();
        }
        self.till_sales.push_back(TillSale {
            receipt: r,
            key: key.clone(),
        });
        GeneratedEvent {
            stream: Stream::Events(Source::Offline),
            key,
            payload,
        }
    }
}

fn unreachable_lognormal() -> LogNormal<f64> {
    // The constant parameters above are valid; this keeps the code free of unwrap.
    LogNormal::new(0.0, 1.0).unwrap_or_else(|_| panic!("standard log-normal is valid"))
}

/// Writes `count` events as JSON lines to `path`, in synthetic time: sessions spread
/// evenly from `start` over `span_days`. For replay, backtests and benchmarks.
pub fn write_file(
    cfg: &GeneratorConfig,
    path: &std::path::Path,
    count: u64,
    start: Millis,
    span_days: f64,
) -> anyhow::Result<u64> {
    use std::io::Write;
    // Written beside it and renamed when whole: an interrupted run leaves no partial
    // file for the next benchmark to take as its input.
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut out = std::io::BufWriter::with_capacity(4 << 20, file);
    let written = write_events(cfg, &mut out, count, start, span_days)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    out.flush()
        .with_context(|| format!("cannot write {}", partial.display()))?;
    drop(out);
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))?;
    Ok(written)
}

/// `count` events as JSON lines, from `start` over `span_days` of event time.
fn write_events(
    cfg: &GeneratorConfig,
    out: &mut impl std::io::Write,
    count: u64,
    start: Millis,
    span_days: f64,
) -> std::io::Result<u64> {
    let mut model = TrafficModel::new(cfg);
    let span = span_days * kairos_core::time::DAY as f64;
    let mut written = 0u64;
    while written < count {
        // Placed by the events written so far, not by an assumed session length, so
        // the file spans `span_days` whatever sessions hold on average.
        let now = start + (span * (written + 1) as f64 / count as f64) as Millis;
        for e in model.session(now) {
            if written >= count {
                break;
            }
            out.write_all(&e.payload)?;
            out.write_all(b"\n")?;
            written += 1;
        }
    }
    Ok(written)
}

pub fn customer_id(i: u64) -> String {
    format!("c{i:06}")
}

/// Publishes generated traffic at `rate` events per second until `limit` events
/// (if any) or `cancel`.
pub async fn run(
    config: Arc<Config>,
    rate: f64,
    limit: Option<u64>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<u64> {
    // Else a broker that creates topics on first use would make them with its own
    // partition count, which the services then refuse.
    kairos_core::kafka::ensure_topics(&config).await?;
    let producer: FutureProducer = kairos_core::kafka::producer(&config)?;
    let mut model = TrafficModel::live(&config.generator, kairos_core::ids::run_nonce());
    let mut sent: u64 = 0;
    let tick = Duration::from_millis(50);
    let per_tick = (rate.max(0.1) * tick.as_secs_f64()).max(0.0);
    let mut budget = 0.0;
    let mut queue: std::collections::VecDeque<GeneratedEvent> = Default::default();
    let mut interval = tokio::time::interval(tick);
    let started = std::time::Instant::now();
    tracing::info!(
        rate,
        customers = config.generator.customers,
        "generating traffic"
    );
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = interval.tick() => {}
        }
        budget += per_tick;
        let mut sends = Vec::new();
        while budget >= 1.0 {
            if limit.is_some_and(|l| sent >= l) {
                break;
            }
            if queue.is_empty() {
                queue.extend(model.session(wall_now()));
            }
            let Some(e) = queue.pop_front() else { break };
            budget -= 1.0;
            sent += 1;
            sends.push(e);
        }
        let topics: Vec<String> = sends
            .iter()
            .map(|e| config.topic(e.stream.topic()))
            .collect();
        let delivered = futures::future::join_all(sends.iter().zip(&topics).map(|(e, t)| {
            producer.send(
                FutureRecord::to(t).key(&e.key).payload(&e.payload),
                Duration::from_secs(30),
            )
        }));
        // A stop does not wait for deliveries: with the broker gone (a killed `kairos
        // up` stops it too) each would wait out the message timeout, a minute.
        let results = tokio::select! {
            results = delivered => results,
            _ = cancel.cancelled() => break,
        };
        for r in results {
            r.map_err(|(e, _)| anyhow::anyhow!("{e}"))
                .context("publishing generated event")?;
        }
        if limit.is_some_and(|l| sent >= l) {
            break;
        }
    }
    tracing::info!(
        sent,
        seconds = started.elapsed().as_secs_f64(),
        "generator stopped"
    );
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn funnel_has_realistic_shape() {
        let mut m = TrafficModel::new(&GeneratorConfig::default());
        let (mut sessions, mut carts, mut purchases) = (0, 0, 0);
        let mut revenue = Vec::new();
        for _ in 0..20_000 {
            let events = m.session(1_764_950_000_000);
            if events
                .iter()
                .any(|e| e.stream == Stream::Events(Source::Offline))
            {
                continue;
            }
            sessions += 1;
            let evs: Vec<CustomerEvent> = events
                .iter()
                .map(|e| serde_json::from_slice(&e.payload).unwrap())
                .collect();
            carts += evs.iter().any(|e| e.event_type == EventType::add_to_cart) as u32;
            for e in &evs {
                if e.event_type == EventType::purchase {
                    purchases += 1;
                    revenue.push(e.order.as_ref().unwrap().total.unwrap());
                }
            }
        }
        let cart_rate = carts as f64 / sessions as f64;
        let buy_rate = purchases as f64 / sessions as f64;
        assert!((0.12..0.18).contains(&cart_rate), "cart rate {cart_rate}");
        assert!((0.02..0.05).contains(&buy_rate), "purchase rate {buy_rate}");
        assert!(carts > 2 * purchases, "most carts are abandoned");
        revenue.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = revenue[revenue.len() / 2];
        let mean = revenue.iter().sum::<f64>() / revenue.len() as f64;
        assert!(
            mean > median,
            "spend is right-skewed: mean {mean} median {median}"
        );
    }

    /// A generated event's JSON.
    fn json(payload: &[u8]) -> serde_json::Value {
        serde_json::from_slice(payload).expect("json")
    }

    /// With `catalog_change_share`, sessions are followed by catalog changes at about
    /// that share: sales (10 to 30% off the list price) that views then show, the list
    /// price back after one, sell-outs and restocks of what sold out. Customers take
    /// back wishes they made. Without the share, the catalog stays as it is.
    #[test]
    fn the_shop_changes_its_catalog_and_customers_take_wishes_back() {
        let mut m = TrafficModel::new(&GeneratorConfig {
            catalog_change_share: 0.02,
            ..GeneratorConfig::default()
        });
        let sessions = 20_000;
        let (mut changes, mut sales, mut restocks, mut sold_out) = (0, 0, 0, HashSet::new());
        // Every product's price (the feed's, then each change's), and those on sale.
        let mut price: HashMap<String, f64> = HashMap::new();
        let mut on_sale: HashMap<String, f64> = HashMap::new();
        let (mut unwished, mut views_at_sale_price, mut feed) = (0, 0, 0);
        for n in 0..sessions {
            for e in m.session(1_764_950_000_000 + n * 60_000) {
                let v = json(&e.payload);
                if e.stream == Stream::Catalog {
                    let product = v["product_id"].as_str().expect("product").to_string();
                    assert_eq!(e.key, product);
                    if n == 0 && v["price"].is_number() && !price.contains_key(&product) {
                        feed += 1;
                        price.insert(product, v["price"].as_f64().unwrap_or_default());
                        continue;
                    }
                    changes += 1;
                    if v["in_stock"] == false {
                        sold_out.insert(product.clone());
                    } else if v["in_stock"] == true {
                        assert!(sold_out.remove(&product), "restocked what sold out");
                        restocks += 1;
                    } else {
                        let p = v["price"].as_f64().expect("a price");
                        let list = price.get(&product).copied().expect("in the feed");
                        if p < list {
                            sales += 1;
                            let off = 1.0 - p / list;
                            assert!((0.09..0.31).contains(&off), "{off} off");
                            on_sale.insert(product, p);
                        } else {
                            assert!(on_sale.remove(&product).is_some(), "back from a sale");
                        }
                    }
                    continue;
                }
                let product = v["product"]["product_id"].as_str().unwrap_or_default();
                match v["event_type"].as_str() {
                    Some("wishlist_remove") => unwished += 1,
                    Some("product_view") => {
                        let shown = v["product"]["price"].as_f64();
                        if on_sale.get(product).is_some_and(|p| Some(*p) == shown) {
                            views_at_sale_price += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
        // The feed went out first: every product with its price.
        assert_eq!(feed, 500);
        let share = f64::from(changes) / sessions as f64;
        assert!(
            (0.015..0.025).contains(&share),
            "catalog change share {share}"
        );
        assert!(
            sales > 0 && restocks > 0,
            "sales {sales}, restocks {restocks}"
        );
        assert!(views_at_sale_price > 0, "views show the changed price");
        assert!(unwished > 0, "wishes taken back");
        let mut plain = TrafficModel::new(&GeneratorConfig::default());
        let catalog = (0..2_000)
            .flat_map(|_| plain.session(1_764_950_000_000))
            .filter(|e| e.stream == Stream::Catalog)
            .count();
        assert_eq!(catalog, 0);
    }

    /// Orders move on (shipped, delivered; a few cancelled or returned), a few till
    /// sales come back as refunds, registered customers log in from other devices,
    /// change consents, move and take out plans, and app events carry a device id.
    #[test]
    fn the_back_office_and_the_customers_change_what_they_started() {
        let mut m = TrafficModel::new(&GeneratorConfig::default());
        let mut statuses: HashMap<String, usize> = HashMap::new();
        let mut placed = HashSet::new();
        let (mut refunds, mut logins, mut withdrawn, mut granted, mut moves, mut plans) =
            (0, 0, 0, 0, 0, 0);
        let mut app_events = (0, 0);
        for _ in 0..100_000 {
            for e in m.session(1_764_950_000_000) {
                let v = json(&e.payload);
                match v["event_type"].as_str().unwrap_or_default() {
                    "purchase" => {
                        placed.insert(v["order"]["order_id"].to_string());
                    }
                    "order_status" => {
                        let order = v["order"]["order_id"].to_string();
                        assert!(placed.contains(&order), "a status of an order placed: {v}");
                        let keyed_by = match (v["customer_id"].as_str(), v["anonymous_id"].as_str())
                        {
                            (Some(c), _) => c.to_string(),
                            (None, Some(a)) => format!("anon:{a}"),
                            (None, None) => String::new(),
                        };
                        assert_eq!(e.key, keyed_by);
                        let status = v["order"]["status"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        *statuses.entry(status).or_default() += 1;
                    }
                    "login" => {
                        logins += 1;
                        assert!(
                            v["customer_id"].is_string() && v["anonymous_id"].is_string(),
                            "{v}"
                        );
                    }
                    "consent_change" if v["consent"]["granted"] == false => withdrawn += 1,
                    "consent_change" => granted += 1,
                    "profile_update" if v["profile"]["time_zone"].is_string() => moves += 1,
                    "profile_update" if v["profile"]["subscription_ends_at"].is_i64() => plans += 1,
                    _ => {}
                }
                if v["kind"] == "refund" {
                    refunds += 1;
                }
                if matches!(v["platform"].as_str(), Some("ios" | "android")) {
                    app_events.0 += 1;
                    app_events.1 += usize::from(v["device_id"].is_string());
                }
            }
        }
        let count = |s: &str| statuses.get(s).copied().unwrap_or_default();
        assert!(count("shipped") > 1_000, "{statuses:?}");
        assert!(count("delivered") > count("shipped") / 2, "{statuses:?}");
        assert!(
            count("cancelled") > 0 && count("cancelled") < count("shipped") / 10,
            "{statuses:?}"
        );
        assert!(
            count("returned") > 0 && count("returned") < count("delivered") / 5,
            "{statuses:?}"
        );
        assert!(refunds > 0, "refunds");
        assert!(logins > 100, "{logins} logins");
        assert!(
            withdrawn > 0 && granted > withdrawn,
            "{granted} granted, {withdrawn} withdrawn"
        );
        assert!(moves > 0 && plans > 0, "{moves} moves, {plans} plans");
        assert!(
            app_events.0 > 0 && app_events.0 == app_events.1,
            "{app_events:?}"
        );
    }

    #[test]
    fn till_sales_are_the_configured_share_of_purchases() {
        for share in [0.25, 0.5] {
            let mut m = TrafficModel::new(&GeneratorConfig {
                offline_share: share,
                ..GeneratorConfig::default()
            });
            let (mut online, mut offline) = (0u32, 0u32);
            for _ in 0..100_000 {
                for e in m.session(1_764_950_000_000) {
                    let v = json(&e.payload);
                    if e.stream == Stream::Events(Source::Offline) {
                        offline += u32::from(v["kind"] == "sale");
                    } else if v["event_type"] == "purchase" {
                        online += 1;
                    }
                }
            }
            let measured = f64::from(offline) / f64::from(online + offline);
            assert!(
                (share - 0.03..share + 0.03).contains(&measured),
                "{share}: {offline} till sales of {} purchases",
                online + offline
            );
        }
    }

    #[test]
    fn visits_are_skewed_towards_frequent_customers_but_none_dominates() {
        let mut m = TrafficModel::new(&GeneratorConfig::default());
        let customers = GeneratorConfig::default().customers;
        let mut visits = vec![0u32; customers as usize];
        let draws = 200_000;
        for _ in 0..draws {
            visits[m.pick_customer() as usize] += 1;
        }
        let share = |n: u32| f64::from(n) / f64::from(draws);
        assert!(
            share(visits[0]) < 0.01,
            "the most frequent: {}",
            share(visits[0])
        );
        let fifth: u32 = visits[..visits.len() / 5].iter().sum();
        assert!(
            (0.4..0.65).contains(&share(fifth)),
            "the first fifth: {}",
            share(fifth)
        );
        let seen = visits.iter().filter(|&&n| n > 0).count();
        assert!(seen > visits.len() / 2, "{seen} customers came at all");
    }

    #[test]
    fn a_session_s_events_are_apart_and_end_at_its_time() {
        let mut m = TrafficModel::new(&GeneratorConfig::default());
        let now = 1_000_000_000;
        let mut long = 0;
        for _ in 0..5_000 {
            let times: Vec<i64> = m
                .session(now)
                .iter()
                .map(|e| {
                    json(&e.payload)["occurred_at"]
                        .as_i64()
                        .expect("occurred_at")
                })
                .collect();
            assert_eq!(times.last(), Some(&now), "{times:?}");
            assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
            long += usize::from(times.len() > 8);
        }
        assert!(long > 100, "{long} sessions of more than eight events");
    }

    #[test]
    fn a_file_spans_the_days_asked_for() {
        let start = 1_767_225_600_000;
        let mut out = Vec::new();
        let written = write_events(&GeneratorConfig::default(), &mut out, 40_000, start, 90.0)
            .expect("written");
        assert_eq!(written, 40_000);
        let times: Vec<i64> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| json(l)["occurred_at"].as_i64().expect("occurred_at"))
            .collect();
        let day = kairos_core::time::DAY as f64;
        let last = (*times.iter().max().expect("events") - start) as f64 / day;
        assert!(
            (89.9..=90.01).contains(&last),
            "the last event after {last} days"
        );
        let first = (*times.iter().min().expect("events") - start) as f64 / day;
        // A session ends at its time: the first one's events begin minutes before.
        assert!(
            (-0.01..0.01).contains(&first),
            "the first event after {first} days"
        );
    }

    /// Every event, order and receipt id of `sessions` sessions of `model`.
    fn ids(mut model: TrafficModel, sessions: usize) -> HashSet<String> {
        let mut ids = HashSet::new();
        for _ in 0..sessions {
            for e in model.session(1_000_000_000) {
                let v = json(&e.payload);
                for field in ["event_id", "receipt_id"] {
                    ids.extend(v[field].as_str().map(str::to_string));
                }
                ids.extend(v["order"]["order_id"].as_str().map(str::to_string));
            }
        }
        ids
    }

    #[test]
    fn files_repeat_their_ids_and_live_runs_never_share_them() {
        let cfg = GeneratorConfig::default();
        let file = ids(TrafficModel::new(&cfg), 2_000);
        assert!(file.len() > 5_000, "{}", file.len());
        assert_eq!(
            file,
            ids(TrafficModel::new(&cfg), 2_000),
            "a file is reproducible"
        );
        let first = ids(TrafficModel::live(&cfg, 1), 2_000);
        let second = ids(TrafficModel::live(&cfg, 2), 2_000);
        assert!(first.len() > 5_000 && second.len() > 5_000);
        assert!(first.is_disjoint(&second), "a second run's ids are its own");
        assert!(first.is_disjoint(&file));
    }
}
