//! Decoding and validation of the raw input topics (site, app and offline events),
//! shared by the processors that read them: a record that fails here goes to the
//! dead-letter topic with the reason.

use crate::calendar;
use crate::contracts::{
    given, is_reserved_customer_id, CustomerEvent, DeadLetterReason, EventType, LineItem,
    OfflineReceipt, OrderStatus, SHARED_IDENTIFIER_SUFFIX,
};
use crate::encoding::{decode_input, Rejection, SchemaRegistry};
use crate::schemas;

/// The raw input topic an event belongs to (site, app or offline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Site,
    App,
    Offline,
}

impl Source {
    /// The name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Site => "site",
            Source::App => "app",
            Source::Offline => "offline",
        }
    }
}

/// A site or app event, decoded (JSON or Avro), checked, and its order's amounts in
/// the base currency (see [`Currencies`]): without identity resolution, so it must name
/// its profile by `customer_id`, `anonymous_id` or `device_id`.
pub fn decode_customer_event(
    payload: &[u8],
    registry: &SchemaRegistry,
    currencies: &Currencies,
) -> Result<CustomerEvent, Rejection> {
    decode_event(payload, registry, currencies, Naming::ProfileKey)
}

/// A site or app event as [`decode_customer_event`] reads it, for the identity
/// processor: an e-mail, phone or loyalty card alone names a customer there (a
/// newsletter form's opt-in has nothing else).
pub fn decode_identifiable_event(
    payload: &[u8],
    registry: &SchemaRegistry,
    currencies: &Currencies,
) -> Result<CustomerEvent, Rejection> {
    decode_event(payload, registry, currencies, Naming::AnyIdentifier)
}

/// What an event must name someone by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// A profile key: `customer_id`, `anonymous_id` or `device_id`.
    ProfileKey,
    /// A profile key, an e-mail, a phone or a loyalty card (identity resolution).
    AnyIdentifier,
}

fn decode_event(
    payload: &[u8],
    registry: &SchemaRegistry,
    currencies: &Currencies,
    naming: Naming,
) -> Result<CustomerEvent, Rejection> {
    let mut e: CustomerEvent = decode_input(payload, schemas::customer_event(), registry)?;
    clean_key("customer_id", &mut e.customer_id)?;
    clean_key("anonymous_id", &mut e.anonymous_id)?;
    clean_key("device_id", &mut e.device_id)?;
    // A card or phone keys state too (`card:`, `phone:` profiles without identity
    // resolution, identity links with it): a card of a megabyte made records the
    // broker refuses.
    clean_key("loyalty_card", &mut e.loyalty_card)?;
    clean_key("phone", &mut e.phone)?;
    // A placeholder id names nobody: taken off (a shop's SDK sends customer_id "0" or
    // "undefined" for every guest, a till card "0" for every walk-in, who would all be
    // one customer), and an event left naming nobody else is refused with it named.
    let mut placeholders = take_placeholders([
        ("customer_id", &mut e.customer_id),
        ("anonymous_id", &mut e.anonymous_id),
        ("device_id", &mut e.device_id),
    ]);
    // A card names someone only to identity resolution: told only there.
    let card = take_placeholder("loyalty_card", &mut e.loyalty_card);
    if naming == Naming::AnyIdentifier {
        placeholders.extend(card);
    }
    let named =
        e.customer_key().is_some() || (naming == Naming::AnyIdentifier && names_a_contact(&e));
    if !named && e.event_type != EventType::heartbeat {
        let wanted = match naming {
            Naming::ProfileKey => "customer_id, anonymous_id or device_id",
            Naming::AnyIdentifier => {
                "customer_id, anonymous_id, device_id, email, phone or loyalty_card"
            }
        };
        if !placeholders.is_empty() {
            return Err(Rejection::new(
                DeadLetterReason::invalid_field,
                format!(
                    "{} is a placeholder that SDKs and tills send for visitors without \
                     one, not an id; the event names no one else ({wanted})",
                    placeholders.join(" and ")
                ),
            ));
        }
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            format!("{wanted} is required"),
        ));
    }
    validate_event(&e)?;
    // Again in the base currency, if converted: a rate can carry an amount past the
    // bound.
    if currencies.convert_event(&mut e)? {
        check_amount("order.total", e.order.as_ref().and_then(|o| o.total))?;
        check_items(&e.items)?;
    }
    Ok(e)
}

/// Takes placeholder ids off each of `ids` (field name, value), returning those taken,
/// each named by its field (see [`take_placeholder`]).
fn take_placeholders<const N: usize>(ids: [(&str, &mut Option<String>); N]) -> Vec<String> {
    (ids.into_iter())
        .filter_map(|(field, id)| take_placeholder(field, id))
        .collect()
}

/// Takes a placeholder id (see [`crate::identifiers::is_placeholder_id`]) off `id`,
/// returning it named by `field` for the reason of a refusal.
fn take_placeholder(field: &str, id: &mut Option<String>) -> Option<String> {
    let placeholder = id
        .as_deref()
        .is_some_and(crate::identifiers::is_placeholder_id);
    placeholder
        .then(|| id.take())
        .flatten()
        .map(|v| format!("{field} {v:?}"))
}

/// Whether an event gives an e-mail, phone or loyalty card (blank ones are absent).
fn names_a_contact(e: &CustomerEvent) -> bool {
    let profile = e.profile.as_ref();
    [
        e.email.as_deref(),
        e.phone.as_deref(),
        e.loyalty_card.as_deref(),
        profile.and_then(|p| p.email.as_deref()),
        profile.and_then(|p| p.phone.as_deref()),
    ]
    .into_iter()
    .flatten()
    .any(|v| !v.trim().is_empty())
}

/// A till receipt, decoded (JSON or Avro), checked, and its amounts in the base
/// currency (see [`Currencies`]).
pub fn decode_receipt(
    payload: &[u8],
    registry: &SchemaRegistry,
    currencies: &Currencies,
) -> Result<OfflineReceipt, Rejection> {
    let mut r: OfflineReceipt = decode_input(payload, schemas::offline_receipt(), registry)?;
    clean_key("customer_id", &mut r.customer_id)?;
    clean_key("loyalty_card", &mut r.loyalty_card)?;
    clean_key("phone", &mut r.phone)?;
    // A till's "0" or "unknown" for a walk-in names nobody, as on the site, as
    // customer id or card.
    let placeholders = take_placeholders([
        ("customer_id", &mut r.customer_id),
        ("loyalty_card", &mut r.loyalty_card),
    ]);
    let placeholder = (!placeholders.is_empty()).then(|| {
        format!(
            "{} is a placeholder, not an id; ",
            placeholders.join(" and ")
        )
    });
    if r.customer_key().is_none() && r.phone.as_deref().is_none_or(|p| p.trim().is_empty()) {
        return Err(Rejection::new(
            if placeholder.is_some() {
                DeadLetterReason::invalid_field
            } else {
                DeadLetterReason::missing_field
            },
            format!(
                "{}receipt needs customer_id, loyalty_card or phone",
                placeholder.unwrap_or_default()
            ),
        ));
    }
    check_id(format_args!("event_id"), &r.event_id)?;
    // Receipts are counted once per receipt id: blank ones would all be one receipt.
    check_id(format_args!("receipt_id"), &r.receipt_id)?;
    check_customer_id(r.customer_id.as_deref())?;
    // Positive for refunds too: `kind` gives the direction.
    check_amount("total", Some(r.total))?;
    check_items(&r.items)?;
    // Again in the base currency, if converted: a rate can carry an amount past the
    // bound.
    if currencies.convert_receipt(&mut r)? {
        check_amount("total", Some(r.total))?;
        check_items(&r.items)?;
    }
    Ok(r)
}

/// Amounts in one currency (`[profile] currency` and `exchange_rates`): an order or
/// receipt in another currency is converted when it is read, so revenue, order values
/// and RFM scores add like with like; one in a currency without a rate is refused.
/// Without `currency`, amounts count as given, whatever currency they name.
#[derive(Debug, Clone, Default)]
pub struct Currencies {
    base: Option<String>,
    /// Upper-case code -> units of `base` per unit of it.
    rates: std::collections::BTreeMap<String, f64>,
}

impl Currencies {
    pub fn new(config: &crate::config::ProfileConfig) -> Self {
        Currencies {
            base: config.currency.as_ref().map(|c| c.to_ascii_uppercase()),
            rates: (config.exchange_rates.iter())
                .map(|(code, rate)| (code.to_ascii_uppercase(), *rate))
                .collect(),
        }
    }

    /// Units of the base currency per unit of `currency` (1 for the base itself, or
    /// when none is named), or why there is none.
    fn rate(&self, field: &str, currency: Option<&str>) -> Result<Option<f64>, Rejection> {
        let (Some(base), Some(code)) = (&self.base, currency.map(str::trim)) else {
            return Ok(None);
        };
        if code.is_empty() || code.eq_ignore_ascii_case(base) {
            return Ok(None);
        }
        match self.rates.get(&code.to_ascii_uppercase()) {
            Some(rate) => Ok(Some(*rate)),
            None => Err(Rejection::new(
                DeadLetterReason::invalid_field,
                format!(
                    "{field} {code:?} is neither profile.currency ({base}) nor one of \
                     profile.exchange_rates"
                ),
            )),
        }
    }

    /// Converts an order's total and line items to the base currency (a no-op for
    /// one in it already, so a record read twice, by the identity processor and then
    /// the profile, is converted once). Returns whether it converted anything.
    fn convert_event(&self, e: &mut CustomerEvent) -> Result<bool, Rejection> {
        let Some(order) = e.order.as_mut() else {
            return Ok(false);
        };
        let Some(rate) = self.rate("order.currency", order.currency.as_deref())? else {
            return Ok(false);
        };
        order.total = order.total.map(|t| in_base(t, rate));
        order.currency = self.base.clone();
        convert_items(&mut e.items, rate);
        Ok(true)
    }

    /// Converts a receipt's total and line items to the base currency; whether it
    /// converted anything.
    fn convert_receipt(&self, r: &mut OfflineReceipt) -> Result<bool, Rejection> {
        // The schema makes a receipt's currency required: a blank one is not the
        // base currency by default, where amounts are converted.
        if self.base.is_some() && r.currency.trim().is_empty() {
            return Err(Rejection::new(
                DeadLetterReason::missing_field,
                "currency is empty (profile.currency is set, so receipts must name theirs)",
            ));
        }
        let Some(rate) = self.rate("currency", Some(&r.currency))? else {
            return Ok(false);
        };
        r.total = in_base(r.total, rate);
        r.currency = self.base.clone().unwrap_or_default();
        convert_items(&mut r.items, rate);
        Ok(true)
    }
}

fn convert_items(items: &mut [LineItem], rate: f64) {
    for item in items {
        item.unit_price = in_base(item.unit_price, rate);
    }
}

/// `amount` times `rate`, to the precision money is compared at.
fn in_base(amount: f64, rate: f64) -> f64 {
    crate::contracts::round_money(amount * rate)
}

/// The largest amount (a total, a price) an input may carry: no order is worth a
/// trillion, and below it sums of amounts and quantities stay finite.
pub const MAX_AMOUNT: f64 = 1e12;

/// The largest quantity of one line item.
pub const MAX_QUANTITY: i32 = 1_000_000;

/// An amount must be a number, not negative and at most [`MAX_AMOUNT`]: a negative
/// total would add to the revenue a refund takes away, a negative price would be a drop
/// of over 100%, NaN would poison every sum it joins, and a huge one would make the
/// revenue infinite for good.
pub fn check_amount(field: &str, amount: Option<f64>) -> Result<(), Rejection> {
    match amount {
        Some(a) if !a.is_finite() || a < 0.0 => Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!("{field} {a} is not a non-negative amount"),
        )),
        Some(a) if a > MAX_AMOUNT => Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!("{field} {a:e} is above the largest amount accepted ({MAX_AMOUNT:e})"),
        )),
        _ => Ok(()),
    }
}

/// An id that keys state (a profile, a ledger), trimmed in place as the identity
/// processor reads it (`identifiers::key_id`): without identity resolution "c1 "
/// would be a second customer beside "c1", with caps of its own.
fn clean_key(field: &str, id: &mut Option<String>) -> Result<(), Rejection> {
    let Some(value) = id.as_mut() else {
        return Ok(());
    };
    let key = crate::identifiers::key_id(value).map_err(|why| {
        Rejection::new(DeadLetterReason::invalid_field, format!("{field}: {why}"))
    })?;
    // The identity processor names the profile of an identifier several customers
    // share `<profile>#shared`: a cookie or card of that form would land in it.
    if key.ends_with(SHARED_IDENTIFIER_SUFFIX) {
        return Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!(
                "{field} {key:?} ends in {SHARED_IDENTIFIER_SUFFIX}, which Kairos keeps for \
                 the profile of an identifier several customers share"
            ),
        ));
    }
    if key.len() != value.len() {
        *value = key.to_string();
    }
    Ok(())
}

/// A customer id of the form Kairos gives profiles it names itself is refused.
fn check_customer_id(id: Option<&str>) -> Result<(), Rejection> {
    match id {
        // Trimmed, as the identity processor reads it.
        Some(id) if is_reserved_customer_id(id.trim()) => Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!(
                "customer_id {id:?} has the form of an id Kairos gives anonymous profiles \
                 (anon:, device:, card:, phone:, email:, customer: or #shared)"
            ),
        )),
        _ => Ok(()),
    }
}

/// An id that must be given: blank is missing (blank order or receipt ids would make
/// every such order a repeat of the first).
/// An event's, order's, receipt's or product's id: given, and no longer than an id
/// that keys state ([`crate::identifiers::MAX_KEY_BYTES`]): ids go into state keys,
/// timer ids and changelog records, and one the size of the event could make a record
/// the broker refuses.
pub fn check_id(field: std::fmt::Arguments<'_>, value: &str) -> Result<(), Rejection> {
    if value.trim().is_empty() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            format!("{field} is empty"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!("{field} has control characters"),
        ));
    }
    let max = crate::identifiers::MAX_KEY_BYTES;
    if value.len() > max {
        return Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!("{field} is {} bytes long, above {max}", value.len()),
        ));
    }
    Ok(())
}

/// The longest product name or category, and customer name, accepted: they are kept
/// in profiles (dozens of products each) and in template variables, so one the size of
/// the event would make a state record the broker refuses.
pub const MAX_TEXT_BYTES: usize = 512;

/// The longest push token or messenger id accepted (a web push subscription is a few
/// hundred bytes).
pub const MAX_TOKEN_BYTES: usize = 2048;

/// A text field no longer than `max` bytes (absent is fine).
pub fn check_text(
    field: std::fmt::Arguments<'_>,
    value: Option<&str>,
    max: usize,
) -> Result<(), Rejection> {
    match value {
        Some(v) if v.len() > max => Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!("{field} is {} bytes long, above {max}", v.len()),
        )),
        _ => Ok(()),
    }
}

fn check_items(items: &[LineItem]) -> Result<(), Rejection> {
    for (i, item) in items.iter().enumerate() {
        check_id(format_args!("items[{i}].product_id"), &item.product_id)?;
        check_text(
            format_args!("items[{i}].name"),
            item.name.as_deref(),
            MAX_TEXT_BYTES,
        )?;
        let category = item.category.as_deref();
        check_text(
            format_args!("items[{i}].category"),
            category,
            MAX_TEXT_BYTES,
        )?;
        if item.quantity < 1 {
            return Err(Rejection::new(
                DeadLetterReason::invalid_field,
                format!("items[{i}].quantity {} is below 1", item.quantity),
            ));
        }
        if item.quantity > MAX_QUANTITY {
            return Err(Rejection::new(
                DeadLetterReason::invalid_field,
                format!(
                    "items[{i}].quantity {} is above the largest accepted ({MAX_QUANTITY})",
                    item.quantity
                ),
            ));
        }
        check_amount(&format!("items[{i}].unit_price"), Some(item.unit_price))?;
    }
    Ok(())
}

/// The checks every site and app event passes before it is applied.
pub fn validate_event(e: &CustomerEvent) -> Result<(), Rejection> {
    check_id(format_args!("event_id"), &e.event_id)?;
    if let Some(order) = &e.order {
        check_id(format_args!("order.order_id"), &order.order_id)?;
    }
    if let Some(product) = &e.product {
        check_id(format_args!("product.product_id"), &product.product_id)?;
        let (name, category) = (product.name.as_deref(), product.category.as_deref());
        check_text(format_args!("product.name"), name, MAX_TEXT_BYTES)?;
        check_text(format_args!("product.category"), category, MAX_TEXT_BYTES)?;
    }
    if let Some(u) = &e.profile {
        for (field, value, max) in [
            ("first_name", &u.first_name, MAX_TEXT_BYTES),
            ("last_name", &u.last_name, MAX_TEXT_BYTES),
            ("email", &u.email, MAX_TEXT_BYTES),
            ("phone", &u.phone, MAX_TEXT_BYTES),
            ("push_token", &u.push_token, MAX_TOKEN_BYTES),
            ("messenger_id", &u.messenger_id, MAX_TOKEN_BYTES),
        ] {
            check_text(format_args!("profile.{field}"), value.as_deref(), max)?;
        }
    }
    check_text(format_args!("email"), e.email.as_deref(), MAX_TEXT_BYTES)?;
    check_customer_id(e.customer_id.as_deref())?;
    let cart_change = matches!(
        e.event_type,
        EventType::add_to_cart | EventType::remove_from_cart
    );
    if cart_change && e.product.is_none() && e.items.is_empty() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            format!("{} needs product or items", e.event_type.as_str()),
        ));
    }
    // A wish is of one product: without it the event would change nothing, so it is
    // refused, not taken. (A product view without one is still a visit.)
    let of_one_product = matches!(
        e.event_type,
        EventType::wishlist_add | EventType::wishlist_remove
    );
    if of_one_product && e.product.is_none() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            format!(
                "{} needs product (items are not read for it)",
                e.event_type.as_str()
            ),
        ));
    }
    if e.event_type == EventType::consent_change && e.consent.is_none() {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            "consent_change needs consent",
        ));
    }
    // A purchase places an order; a cancellation or return of one is an order_status
    // event, and read as a purchase it would count its amount as revenue.
    let purchase_status = (e.event_type == EventType::purchase)
        .then(|| e.order.as_ref().and_then(|o| o.status))
        .flatten()
        .filter(|s| *s != OrderStatus::placed);
    if let Some(status) = purchase_status {
        return Err(Rejection::new(
            DeadLetterReason::invalid_field,
            format!(
                "purchase with order.status {}: only placed (or none) is a purchase; \
                 send an order_status event for the change",
                status.as_str()
            ),
        ));
    }
    if e.event_type == EventType::order_status
        && e.order.as_ref().is_none_or(|o| o.status.is_none())
    {
        return Err(Rejection::new(
            DeadLetterReason::missing_field,
            "order_status needs order.status",
        ));
    }
    check_amount("order.total", e.order.as_ref().and_then(|o| o.total))?;
    check_amount("product.price", e.product.as_ref().and_then(|p| p.price))?;
    check_items(&e.items)?;
    if let Some(ends) = e.profile.as_ref().and_then(|p| p.subscription_ends_at) {
        crate::time::check_input_time(ends).map_err(|reason| {
            Rejection::new(
                DeadLetterReason::invalid_field,
                format!("profile.subscription_ends_at: {reason}"),
            )
        })?;
    }
    // Blank text fields are absent (see `CustomerProfile::touch`): a form's empty
    // birthday or zone field does not cost the event.
    if let Some(b) = e.profile.as_ref().and_then(|p| given(&p.birthday)) {
        if calendar::month_day(b).is_none() {
            return Err(Rejection::new(
                DeadLetterReason::invalid_field,
                format!("birthday {b:?} is not YYYY-MM-DD"),
            ));
        }
    }
    if let Some(z) = e.profile.as_ref().and_then(|p| given(&p.time_zone)) {
        if z.parse::<chrono_tz::Tz>().is_err() {
            return Err(Rejection::new(
                DeadLetterReason::invalid_field,
                format!("time_zone {z:?} is not an IANA zone"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::MAX_REASON_BYTES;

    /// No `profile.currency`: amounts as given.
    const NONE: Currencies = Currencies {
        base: None,
        rates: std::collections::BTreeMap::new(),
    };

    #[test]
    fn orders_and_receipts_are_converted_into_the_base_currency_once() {
        let registry = SchemaRegistry::new(None);
        let config = crate::config::ProfileConfig {
            currency: Some("EUR".into()),
            exchange_rates: [("usd".to_string(), 0.9)].into(),
            ..Default::default()
        };
        let currencies = Currencies::new(&config);
        let purchase = |currency: &str| {
            serde_json::json!({"event_id": "e1", "event_type": "purchase",
                "occurred_at": 1_764_950_000_000_i64, "customer_id": "c1",
                "order": {"order_id": "o1", "total": 10.0, "currency": currency},
                "items": [{"product_id": "p1", "quantity": 2, "unit_price": 5.0}]})
            .to_string()
        };
        let mut e = decode_customer_event(purchase("USD").as_bytes(), &registry, &currencies)
            .expect("a rate");
        let order = e.order.clone().expect("order");
        assert_eq!(
            (order.total, order.currency.as_deref()),
            (Some(9.0), Some("EUR"))
        );
        assert_eq!(e.items[0].unit_price, 4.5);
        // Read a second time (the identity processor, then the profile): once.
        currencies.convert_event(&mut e).expect("base");
        assert_eq!(e.order.as_ref().and_then(|o| o.total), Some(9.0));
        let e = decode_customer_event(purchase("eur").as_bytes(), &registry, &currencies)
            .expect("base");
        assert_eq!(e.order.as_ref().and_then(|o| o.total), Some(10.0));
        let r =
            decode_customer_event(purchase("GBP").as_bytes(), &registry, &currencies).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::invalid_field);
        // Without a base currency nothing is converted or refused.
        let e =
            decode_customer_event(purchase("GBP").as_bytes(), &registry, &NONE).expect("as given");
        assert_eq!(e.order.as_ref().and_then(|o| o.total), Some(10.0));
        let receipt = serde_json::json!({"event_id": "r1", "receipt_id": "r1",
            "kind": "sale", "store_id": "s1", "occurred_at": 1_764_950_000_000_i64,
            "customer_id": "c2", "total": 20.0, "currency": "USD",
            "items": [{"product_id": "p1", "quantity": 1, "unit_price": 20.0}]});
        let r =
            decode_receipt(receipt.to_string().as_bytes(), &registry, &currencies).expect("a rate");
        assert_eq!(
            (r.total, r.currency.as_str(), r.items[0].unit_price),
            (18.0, "EUR", 18.0)
        );
    }

    #[test]
    fn ids_that_key_state_are_trimmed_and_bounded() {
        let registry = SchemaRegistry::new(None);
        let event = |id: &str| {
            serde_json::json!({"event_id": "e1", "event_type": "page_view", "occurred_at": 1_764_950_000_000_i64,
                "customer_id": id, "anonymous_id": format!(" {id}\t")})
            .to_string()
        };
        let e = decode_customer_event(event("c1 ").as_bytes(), &registry, &NONE).expect("valid");
        assert_eq!(e.customer_id.as_deref(), Some("c1"));
        assert_eq!(e.anonymous_id.as_deref(), Some("c1"));
        let receipt = serde_json::json!({"event_id": "r1", "receipt_id": "r1", "kind": "sale",
            "store_id": "s1", "occurred_at": 1_764_950_000_000_i64, "customer_id": "\nc2 ", "total": 10.0,
            "currency": "EUR", "items": []});
        let r = decode_receipt(receipt.to_string().as_bytes(), &registry, &NONE).expect("valid");
        assert_eq!(r.customer_id.as_deref(), Some("c2"));
        for bad in ["c\u{0}1".to_string(), "c".repeat(201)] {
            let r = decode_customer_event(event(&bad).as_bytes(), &registry, &NONE).unwrap_err();
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{bad:?}");
        }
        // Cards and phones key state too: bounded on events and receipts alike.
        let long_card = "A".repeat(201);
        for (field, value) in [("loyalty_card", &long_card), ("phone", &"1".repeat(201))] {
            let mut event: serde_json::Value = serde_json::from_str(&event("c3")).expect("json");
            event[field] = value.as_str().into();
            let r =
                decode_customer_event(event.to_string().as_bytes(), &registry, &NONE).unwrap_err();
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{field}");
            assert!(r.message.starts_with(field), "{}", r.message);
            let mut receipt = receipt.clone();
            receipt[field] = value.as_str().into();
            let r = decode_receipt(receipt.to_string().as_bytes(), &registry, &NONE).unwrap_err();
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{field}");
        }
        let mut carded = receipt.clone();
        carded["loyalty_card"] = " 1234-5678 ".into();
        let r = decode_receipt(carded.to_string().as_bytes(), &registry, &NONE).expect("valid");
        assert_eq!(r.loyalty_card.as_deref(), Some("1234-5678"));
    }

    /// An id the size of the event would go into state keys, timer ids and changelog
    /// records (a record the broker could refuse, holding up the service): refused.
    #[test]
    fn an_id_longer_than_a_state_key_is_refused() {
        let registry = SchemaRegistry::new(None);
        let long = "e".repeat(201);
        let purchase = serde_json::json!({"event_id": "e1", "event_type": "purchase",
            "occurred_at": 1_764_950_000_000_i64, "customer_id": "c1",
            "order": {"order_id": "o1", "total": 10.0},
            "items": [{"product_id": "p1", "quantity": 1, "unit_price": 10.0}]});
        let receipt = serde_json::json!({"event_id": "r1", "receipt_id": "r1", "kind": "sale",
            "store_id": "s1", "occurred_at": 1_764_950_000_000_i64, "customer_id": "c1",
            "total": 10.0, "currency": "EUR", "items": []});
        for pointer in ["/event_id", "/order/order_id", "/items/0/product_id"] {
            let with = |value: &str| {
                let mut e = purchase.clone();
                if let Some(field) = e.pointer_mut(pointer) {
                    *field = value.into();
                }
                decode_customer_event(e.to_string().as_bytes(), &registry, &NONE)
            };
            with(&"x".repeat(200))
                .unwrap_or_else(|r| panic!("200 bytes are fine: {pointer}: {}", r.message));
            let r = with(&long).unwrap_err();
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{pointer}");
            assert!(r.message.contains("201 bytes"), "{}", r.message);
            // A NUL could make one id another's key (feedback's order keys use it).
            let r = with("order\u{0}c1\u{0}o-7").unwrap_err();
            assert!(r.message.contains("control characters"), "{}", r.message);
        }
        for field in ["event_id", "receipt_id"] {
            let mut r = receipt.clone();
            r[field] = long.as_str().into();
            let rejection = decode_receipt(r.to_string().as_bytes(), &registry, &NONE).unwrap_err();
            assert_eq!(rejection.reason, DeadLetterReason::invalid_field, "{field}");
            assert!(
                rejection.message.starts_with(field),
                "{}",
                rejection.message
            );
        }
    }

    /// A product's name or category, a customer's name or contact, kept in profiles
    /// and template variables, has a bound too.
    #[test]
    fn a_text_longer_than_a_profile_keeps_is_refused() {
        let registry = SchemaRegistry::new(None);
        let event = serde_json::json!({"event_id": "e1", "event_type": "add_to_cart",
            "occurred_at": 1_764_950_000_000_i64, "customer_id": "c1",
            "product": {"product_id": "p1", "name": "Mug", "category": "kitchen"},
            "items": [{"product_id": "p1", "name": "Mug", "quantity": 1, "unit_price": 1.0}],
            "profile": {"first_name": "Ann", "push_token": "t"}});
        for (pointer, max) in [
            ("/product/name", MAX_TEXT_BYTES),
            ("/product/category", MAX_TEXT_BYTES),
            ("/items/0/name", MAX_TEXT_BYTES),
            ("/profile/first_name", MAX_TEXT_BYTES),
            ("/profile/push_token", MAX_TOKEN_BYTES),
        ] {
            let with = |len: usize| {
                let mut e = event.clone();
                if let Some(field) = e.pointer_mut(pointer) {
                    *field = "ä".repeat(len / 2).into();
                }
                decode_customer_event(e.to_string().as_bytes(), &registry, &NONE)
            };
            with(max).unwrap_or_else(|r| panic!("{pointer} at the bound: {}", r.message));
            let r = with(max + 2).unwrap_err();
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{pointer}");
            assert!(r.message.contains("bytes long"), "{}", r.message);
        }
    }

    /// A wish without its product would be taken and change nothing; a view without
    /// one is still a visit.
    #[test]
    fn a_wish_without_its_product_is_refused() {
        let registry = SchemaRegistry::new(None);
        let event = |event_type: &str, product: &str| {
            format!(
                r#"{{"event_id":"e1","event_type":"{event_type}","occurred_at":1764950000000,"customer_id":"c1"{product}}}"#
            )
        };
        let items = r#","items":[{"product_id":"p1","quantity":1,"unit_price":1.0}]"#;
        let product = r#","product":{"product_id":"p1"}"#;
        for event_type in ["wishlist_add", "wishlist_remove"] {
            for without in ["", items] {
                let r =
                    decode_customer_event(event(event_type, without).as_bytes(), &registry, &NONE)
                        .unwrap_err();
                assert_eq!(r.reason, DeadLetterReason::missing_field, "{event_type}");
                assert!(r.message.contains("needs product"), "{}", r.message);
            }
            decode_customer_event(event(event_type, product).as_bytes(), &registry, &NONE)
                .unwrap_or_else(|r| panic!("{event_type}: {}", r.message));
        }
        decode_customer_event(event("add_to_cart", items).as_bytes(), &registry, &NONE)
            .unwrap_or_else(|r| panic!("a cart change of items: {}", r.message));
        decode_customer_event(event("product_view", "").as_bytes(), &registry, &NONE)
            .unwrap_or_else(|r| panic!("a view without its product: {}", r.message));
    }

    #[test]
    fn a_reason_quoting_a_huge_field_is_cut_to_fit_a_dead_letter() {
        let registry = SchemaRegistry::new(None);
        let huge = "A".repeat(450_000);
        let event = format!(
            r#"{{"event_id":"e1","event_type":"page_view","customer_id":"c1","occurred_at":"{huge}"}}"#
        );
        let r = decode_customer_event(event.as_bytes(), &registry, &NONE).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::invalid_field);
        assert!(
            r.message.len() <= MAX_REASON_BYTES + 40,
            "{}",
            r.message.len()
        );
        assert!(r.message.ends_with("bytes, cut)"), "{}", &r.message[1000..]);
        // Cut on a character boundary: a reason of multi-byte characters stays text.
        let r = Rejection::new(DeadLetterReason::invalid_field, "é".repeat(2_000));
        assert!(r.message.starts_with(&"é".repeat(512)), "{}", r.message);
        assert!(r.message.contains("4000 bytes, cut"), "{}", r.message);
    }

    #[test]
    fn a_purchase_that_is_not_placed_is_refused() {
        let registry = SchemaRegistry::new(None);
        let purchase = |status: &str| {
            format!(
                r#"{{"event_id":"e1","event_type":"purchase","occurred_at":1764950000000,"customer_id":"c1","order":{{"order_id":"o1","total":100.0{status}}}}}"#
            )
        };
        for status in ["", r#","status":"placed""#] {
            decode_customer_event(purchase(status).as_bytes(), &registry, &NONE)
                .unwrap_or_else(|r| panic!("{status}: {}", r.message));
        }
        for status in ["cancelled", "returned", "shipped", "delivered"] {
            let with = format!(r#","status":"{status}""#);
            let r = decode_customer_event(purchase(&with).as_bytes(), &registry, &NONE)
                .expect_err(status);
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{status}");
            assert!(r.message.contains(status), "{}", r.message);
        }
    }

    #[test]
    fn a_placeholder_customer_id_names_nobody() {
        let registry = SchemaRegistry::new(None);
        let event = |ids: &str| {
            format!(
                r#"{{"event_id":"e1","event_type":"add_to_cart","occurred_at":1764950000000,{ids},"product":{{"product_id":"p1"}}}}"#
            )
        };
        // Magento's guest, a JavaScript SDK's logged-out visitor: the cookie keys it.
        for guest in ["0", "undefined", "null", "-1"] {
            let ids = format!(r#""customer_id":"{guest}","anonymous_id":"a-1""#);
            let e = decode_customer_event(event(&ids).as_bytes(), &registry, &NONE)
                .unwrap_or_else(|r| panic!("{guest}: {}", r.message));
            assert_eq!(e.customer_id, None, "{guest}");
            assert_eq!(e.customer_key().as_deref(), Some("anon:a-1"), "{guest}");
            let alone = format!(r#""customer_id":"{guest}""#);
            let r =
                decode_customer_event(event(&alone).as_bytes(), &registry, &NONE).expect_err(guest);
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{guest}");
            assert!(r.message.contains("placeholder"), "{}", r.message);
        }
        let receipt = |ids: &str| {
            format!(
                r#"{{"event_id":"r1","receipt_id":"r1","kind":"sale","store_id":"s1","occurred_at":1764950000000,{ids},"total":10.0,"currency":"EUR","items":[]}}"#
            )
        };
        let r = decode_receipt(
            receipt(r#""customer_id":"0","phone":"+4915100000001""#).as_bytes(),
            &registry,
            &NONE,
        )
        .unwrap_or_else(|r| panic!("{}", r.message));
        assert_eq!(r.customer_id, None);
        assert_eq!(r.customer_key().as_deref(), Some("phone:+4915100000001"));
        let r = decode_receipt(
            receipt(r#""customer_id":"unknown""#).as_bytes(),
            &registry,
            &NONE,
        )
        .expect_err("a walk-in");
        assert_eq!(r.reason, DeadLetterReason::invalid_field);
        assert!(r.message.contains("placeholder"), "{}", r.message);
        // A till's walk-in card "0" names nobody either: taken off a receipt with a
        // phone, refused on one without.
        let r = decode_receipt(
            receipt(r#""loyalty_card":"0000","phone":"+4915100000001""#).as_bytes(),
            &registry,
            &NONE,
        )
        .unwrap_or_else(|r| panic!("{}", r.message));
        assert_eq!(r.loyalty_card, None);
        assert_eq!(r.customer_key().as_deref(), Some("phone:+4915100000001"));
        let r = decode_receipt(
            receipt(r#""loyalty_card":"0""#).as_bytes(),
            &registry,
            &NONE,
        )
        .expect_err("a walk-in's card");
        assert_eq!(r.reason, DeadLetterReason::invalid_field);
        assert!(
            r.message.starts_with("loyalty_card \"0\" is a placeholder"),
            "{}",
            r.message
        );
        // Under the profile's own naming a card names no one anyway: not the
        // placeholder's fault.
        let r = decode_customer_event(event(r#""loyalty_card":"0""#).as_bytes(), &registry, &NONE)
            .expect_err("a card alone");
        assert_eq!(r.reason, DeadLetterReason::missing_field, "{}", r.message);
        let ids = r#""loyalty_card":"none","anonymous_id":"a-1""#;
        let e = decode_customer_event(event(ids).as_bytes(), &registry, &NONE)
            .unwrap_or_else(|r| panic!("{}", r.message));
        assert_eq!(e.loyalty_card, None);
        let r =
            decode_identifiable_event(event(r#""loyalty_card":"-1""#).as_bytes(), &registry, &NONE)
                .expect_err("a card placeholder alone");
        assert!(r.message.contains("loyalty_card \"-1\""), "{}", r.message);
    }

    #[test]
    fn identity_resolution_takes_an_event_named_by_a_contact_alone() {
        let registry = SchemaRegistry::new(None);
        let optin = r#"{"event_id":"e1","event_type":"consent_change","occurred_at":1764950000000,"email":"ann@example.com","consent":{"channel":"email","granted":true}}"#;
        let r = decode_customer_event(optin.as_bytes(), &registry, &NONE).expect_err("no key");
        assert_eq!(r.reason, DeadLetterReason::missing_field);
        let e = decode_identifiable_event(optin.as_bytes(), &registry, &NONE)
            .unwrap_or_else(|r| panic!("{}", r.message));
        assert_eq!(e.email.as_deref(), Some("ann@example.com"));
        // A profile update's phone names someone too; a blank e-mail does not.
        let update = r#"{"event_id":"e2","event_type":"profile_update","occurred_at":1764950000000,"profile":{"phone":"+4915100000001"}}"#;
        decode_identifiable_event(update.as_bytes(), &registry, &NONE)
            .unwrap_or_else(|r| panic!("{}", r.message));
        let blank =
            r#"{"event_id":"e3","event_type":"page_view","occurred_at":1764950000000,"email":" "}"#;
        let r = decode_identifiable_event(blank.as_bytes(), &registry, &NONE).expect_err("blank");
        assert_eq!(r.reason, DeadLetterReason::missing_field);
        assert!(r.message.contains("loyalty_card"), "{}", r.message);
    }

    #[test]
    fn a_receipt_amount_is_checked_in_the_base_currency_and_its_currency_named() {
        let registry = SchemaRegistry::new(None);
        let config = crate::config::ProfileConfig {
            currency: Some("EUR".into()),
            exchange_rates: [("idr".to_string(), 10.0)].into(),
            ..Default::default()
        };
        let currencies = Currencies::new(&config);
        let receipt = |total: f64, currency: &str| {
            serde_json::json!({"event_id": "r1", "receipt_id": "r1", "kind": "sale",
                "store_id": "s1", "occurred_at": 1_764_950_000_000_i64, "customer_id": "c1",
                "total": total, "currency": currency, "items": []})
            .to_string()
        };
        decode_receipt(receipt(5e10, "IDR").as_bytes(), &registry, &currencies)
            .unwrap_or_else(|r| panic!("{}", r.message));
        let r = decode_receipt(receipt(5e11, "IDR").as_bytes(), &registry, &currencies)
            .expect_err("5e12 in euros");
        assert_eq!(r.reason, DeadLetterReason::invalid_field);
        assert!(r.message.contains("largest amount"), "{}", r.message);
        let r = decode_receipt(receipt(10.0, " ").as_bytes(), &registry, &currencies)
            .expect_err("blank currency");
        assert_eq!(r.reason, DeadLetterReason::missing_field);
        assert!(r.message.starts_with("currency is empty"), "{}", r.message);
        // Without a base currency amounts count as given, whatever they name.
        decode_receipt(receipt(10.0, "").as_bytes(), &registry, &NONE)
            .unwrap_or_else(|r| panic!("{}", r.message));
    }

    #[test]
    fn a_customer_id_of_the_form_kairos_names_profiles_is_refused() {
        let registry = SchemaRegistry::new(None);
        let event = |customer: &str| {
            format!(
                r#"{{"event_id":"e1","event_type":"page_view","occurred_at":1764950000000,"customer_id":"{customer}"}}"#
            )
        };
        let receipt = |customer: &str| {
            format!(
                r#"{{"event_id":"r1","receipt_id":"r1","kind":"sale","store_id":"s1","occurred_at":1764950000000,"customer_id":"{customer}","total":10.0,"currency":"EUR","items":[]}}"#
            )
        };
        for id in ["c-1", "anonymous:x", "card", "a#shared-not"] {
            assert!(
                decode_customer_event(event(id).as_bytes(), &registry, &NONE).is_ok(),
                "{id}"
            );
            assert!(
                decode_receipt(receipt(id).as_bytes(), &registry, &NONE).is_ok(),
                "{id}"
            );
        }
        for id in [
            "anon:a-7",
            "device:d1",
            "card:123",
            "phone:+49",
            "email:a@b.c",
            "customer:1",
            "card:1#shared",
            // Identity trims ids: a space in front hides nothing.
            " anon:a-7",
            "device:d1 ",
        ] {
            let rejection =
                decode_customer_event(event(id).as_bytes(), &registry, &NONE).expect_err(id);
            assert_eq!(rejection.reason, DeadLetterReason::invalid_field, "{id}");
            assert!(
                rejection.message.contains("customer_id"),
                "{id}: {}",
                rejection.message
            );
            assert!(
                decode_receipt(receipt(id).as_bytes(), &registry, &NONE).is_err(),
                "{id}"
            );
        }
        // Nor may a cookie, device or card end as a shared identifier's profile does.
        for field in ["anonymous_id", "device_id", "loyalty_card"] {
            let event = format!(
                r#"{{"event_id":"e1","event_type":"page_view","occurred_at":1764950000000,"{field}":"K#shared"}}"#
            );
            let rejection =
                decode_customer_event(event.as_bytes(), &registry, &NONE).expect_err(field);
            assert_eq!(rejection.reason, DeadLetterReason::invalid_field);
            assert!(
                rejection.message.starts_with(field) && rejection.message.contains("#shared"),
                "{}",
                rejection.message
            );
        }
    }
}
