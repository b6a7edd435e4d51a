//! Message templates: one `<template>.toml` per template id under the templates
//! directory, with a section per channel:
//!
//! ```toml
//! [email]
//! subject = "{{ first_name }}, your cart is waiting"
//! preheader = "Still thinking it over?"
//! body = "..."
//! [sms]
//! text = "..."
//! [push]
//! title = "..."
//! text = "..."
//! [messenger]
//! text = "..."
//! ```
//!
//! Templates are minijinja with strict undefined behaviour, and variables whose value
//! is null are removed first, so a missing name fails the render ("failed: template")
//! instead of sending "Hello, !". Optional parts say so: `{{ first_name | default("there") }}`.
//! Channel limits are checked on the static text at load and on the result at render.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kairos_core::contracts::Channel;
use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;

/// Longest e-mail subject, in characters (longer ones are cut off by mail clients).
pub const SUBJECT_MAX_CHARS: usize = 150;
/// Longest push title and text, in characters (what iOS and Android show).
pub const PUSH_TITLE_MAX_CHARS: usize = 65;
pub const PUSH_TEXT_MAX_CHARS: usize = 178;
/// Most SMS segments a message may take.
pub const SMS_MAX_SEGMENTS: usize = 3;
/// Longest messenger text (Telegram's limit, the strictest of the common bots).
pub const MESSENGER_MAX_CHARS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{file}: {message}")]
    Load { file: PathBuf, message: String },
    #[error("template {template:?} has no [{channel}] section")]
    MissingChannel { template: String, channel: Channel },
    #[error("template {template:?} [{channel}] {field}: {message}")]
    Render {
        template: String,
        channel: Channel,
        field: &'static str,
        message: String,
    },
}

/// A rendered message, ready for a provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RenderedMessage {
    /// E-mail subject or push title.
    pub subject: Option<String>,
    pub preheader: Option<String>,
    /// E-mail body or the text of SMS, push and messenger messages.
    pub body: String,
    /// This send's opt-out link (the channel's `list_unsubscribe` with its ids and
    /// token filled in), for the provider's `List-Unsubscribe` header or request: made
    /// once by the worker, which the template's `unsubscribe_url` shows too.
    pub unsubscribe_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    #[serde(default)]
    email: Option<EmailTemplate>,
    #[serde(default)]
    sms: Option<TextTemplate>,
    #[serde(default)]
    push: Option<PushTemplate>,
    #[serde(default)]
    messenger: Option<TextTemplate>,
    #[serde(default)]
    in_app: Option<PushTemplate>,
    #[serde(default)]
    webhook: Option<TextTemplate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailTemplate {
    subject: String,
    #[serde(default)]
    preheader: Option<String>,
    body: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextTemplate {
    text: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushTemplate {
    #[serde(default)]
    title: Option<String>,
    text: String,
}

/// One channel's parts of a template: (field, source, limit check).
type Parts = Vec<(&'static str, String)>;

/// Every template of one channel, compiled.
pub struct TemplateSet {
    channel: Channel,
    env: Environment<'static>,
    /// Template id -> fields present.
    fields: BTreeMap<String, Vec<&'static str>>,
}

impl TemplateSet {
    /// Loads every `*.toml` under `dir` that has a section for `channel`.
    pub fn load(dir: &Path, channel: Channel) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Keeps each template's source for its errors, so a failed render can quote the
        // expression that had no value (it is only read when a render fails).
        env.set_debug(true);
        env.add_filter("money", money);
        env.add_filter("url_part", url_part);
        let mut fields = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| TemplateError::Load {
            file: dir.to_path_buf(),
            message: format!("cannot read the templates directory: {e}"),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for file in files {
            let id = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let text = std::fs::read_to_string(&file).map_err(|e| TemplateError::Load {
                file: file.clone(),
                message: e.to_string(),
            })?;
            let parsed: TemplateFile = toml::from_str(&text).map_err(|e| TemplateError::Load {
                file: file.clone(),
                message: e.to_string(),
            })?;
            let Some(parts) = parts_for(&parsed, channel) else {
                continue;
            };
            let mut present = Vec::new();
            for (field, source) in parts {
                check_static_limit(channel, field, &source).map_err(|message| {
                    TemplateError::Load {
                        file: file.clone(),
                        message: format!("[{channel}] {field}: {message}"),
                    }
                })?;
                env.add_template_owned(format!("{id}/{field}"), source)
                    .map_err(|e| TemplateError::Load {
                        file: file.clone(),
                        message: format!("[{channel}] {field}: {e}"),
                    })?;
                present.push(field);
            }
            fields.insert(id, present);
        }
        Ok(TemplateSet {
            channel,
            env,
            fields,
        })
    }

    pub fn contains(&self, template: &str) -> bool {
        self.fields.contains_key(template)
    }

    /// Renders `template` with the JSON object `variables`.
    pub fn render(
        &self,
        template: &str,
        variables: &serde_json::Value,
    ) -> Result<RenderedMessage, TemplateError> {
        let Some(fields) = self.fields.get(template) else {
            return Err(TemplateError::MissingChannel {
                template: template.to_string(),
                channel: self.channel,
            });
        };
        // A null is as good as missing, at any depth (a cart item without a name): it
        // must not render as "none".
        let context = match variables {
            serde_json::Value::Object(_) => without_nulls(variables),
            _ => serde_json::Value::Object(serde_json::Map::new()),
        };
        let mut message = RenderedMessage::default();
        for field in fields {
            let compiled = self
                .env
                .get_template(&format!("{template}/{field}"))
                .map_err(|e| self.render_error(template, field, e.to_string()))?;
            let rendered = compiled.render(&context).map_err(|e| {
                // Name what the fix needs: the variables the message lacks that the
                // failing line uses (not optional ones elsewhere in the template, with
                // `| default` or `is defined`), and the expression that failed
                // (`item.quantity`, a field missing inside a list item, or the filter a
                // missing list went through).
                let source = e.template_source();
                let expression = source
                    .zip(e.range())
                    .and_then(|(source, range)| source.get(range));
                let line = source
                    .zip(e.line())
                    .and_then(|(source, n)| source.lines().nth(n.checked_sub(1)?));
                let mut missing: Vec<String> = compiled
                    .undeclared_variables(false)
                    .into_iter()
                    .filter(|v| context.get(v).is_none())
                    .filter(|v| line.is_none_or(|line| uses_name(line, v)))
                    .collect();
                missing.sort();
                let undefined = e.kind() == minijinja::ErrorKind::UndefinedError;
                let message = match (missing.is_empty(), expression) {
                    (false, Some(at)) => {
                        format!("missing variable {} (at `{at}`): {e}", missing.join(", "))
                    }
                    (false, None) => format!("missing variable {}: {e}", missing.join(", ")),
                    (true, Some(at)) if undefined => format!("missing variable in `{at}`: {e}"),
                    (true, Some(at)) => format!("in `{at}`: {e}"),
                    (true, None) => e.to_string(),
                };
                self.render_error(template, field, message)
            })?;
            let rendered = fit_rendered(self.channel, field, rendered)
                .map_err(|m| self.render_error(template, field, m))?;
            match *field {
                "subject" | "title" => message.subject = Some(rendered),
                "preheader" => message.preheader = Some(rendered),
                _ => message.body = rendered,
            }
        }
        Ok(message)
    }

    fn render_error(&self, template: &str, field: &'static str, message: String) -> TemplateError {
        TemplateError::Render {
            template: template.to_string(),
            channel: self.channel,
            field,
            message,
        }
    }
}

fn parts_for(file: &TemplateFile, channel: Channel) -> Option<Parts> {
    Some(match channel {
        Channel::email => {
            let e = file.email.as_ref()?;
            let mut parts = vec![("subject", e.subject.clone())];
            if let Some(p) = &e.preheader {
                parts.push(("preheader", p.clone()));
            }
            parts.push(("body", e.body.clone()));
            parts
        }
        Channel::push | Channel::in_app => {
            let p = if channel == Channel::push {
                file.push.as_ref()?
            } else {
                file.in_app.as_ref()?
            };
            let mut parts = Vec::new();
            if let Some(t) = &p.title {
                parts.push(("title", t.clone()));
            }
            parts.push(("text", p.text.clone()));
            parts
        }
        Channel::sms => vec![("text", file.sms.as_ref()?.text.clone())],
        Channel::messenger => vec![("text", file.messenger.as_ref()?.text.clone())],
        Channel::webhook => vec![("text", file.webhook.as_ref()?.text.clone())],
    })
}

/// The text of a template outside `{{ }}`, `{% %}` and `{# #}`. For templates without
/// branches this is what every rendering contains at least; text in `{% if %}` branches
/// is all counted, so the load-time check is conservative (the render check is exact).
fn static_text(source: &str) -> String {
    let mut out = String::new();
    let mut rest = source;
    while let Some(start) = rest.find(['{']) {
        let (before, from) = rest.split_at(start);
        out.push_str(before);
        let close = match from.get(..2) {
            Some("{{") => "}}",
            Some("{%") => "%}",
            Some("{#") => "#}",
            _ => {
                out.push('{');
                rest = &from[1..];
                continue;
            }
        };
        match from.find(close) {
            Some(end) => rest = &from[end + 2..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn limit_of(channel: Channel, field: &str) -> Option<(usize, &'static str)> {
    match (channel, field) {
        (Channel::email, "subject") => Some((SUBJECT_MAX_CHARS, "characters")),
        (Channel::push | Channel::in_app, "title") => Some((PUSH_TITLE_MAX_CHARS, "characters")),
        (Channel::push | Channel::in_app, "text") => Some((PUSH_TEXT_MAX_CHARS, "characters")),
        (Channel::sms, "text") => Some((SMS_MAX_SEGMENTS, "SMS segments")),
        (Channel::messenger, "text") => Some((MESSENGER_MAX_CHARS, "characters")),
        _ => None,
    }
}

/// `{{ cart_value | money }}`: an amount with two decimals ("10.00", not "10.0" or
/// "59.900000000000006" as a float prints).
fn money(amount: f64) -> String {
    format!("{amount:.2}")
}

/// `https://shop.example/p/{{ product_id | url_part }}`: text as one part of a URL,
/// every character but RFC 3986's unreserved ones percent-encoded, so an id holding
/// a space, `/`, `?` or `#` stays one path segment.
fn url_part(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

fn measure(channel: Channel, text: &str) -> usize {
    if channel == Channel::sms {
        sms_segments(text)
    } else {
        text.chars().count()
    }
}

fn check_static_limit(channel: Channel, field: &str, source: &str) -> Result<(), String> {
    let Some((limit, unit)) = limit_of(channel, field) else {
        return Ok(());
    };
    let fixed = measure(channel, &static_text(source));
    if fixed > limit {
        return Err(format!(
            "the fixed text alone is {fixed} {unit}, the limit is {limit}"
        ));
    }
    Ok(())
}

/// A rendered field as it goes out. Over its channel's display limit it is cut to fit,
/// ending in "…": a long product name in a push title must not cost the message
/// (phones and mail clients cut long titles themselves). SMS text is not cut: its
/// length is its price, so it fails instead (the fixed text was checked at load).
fn fit_rendered(channel: Channel, field: &str, text: String) -> Result<String, String> {
    if text.trim().is_empty() && matches!(field, "subject" | "text" | "body") {
        return Err("renders empty".into());
    }
    let Some((limit, unit)) = limit_of(channel, field) else {
        return Ok(text);
    };
    let n = measure(channel, &text);
    if n <= limit {
        return Ok(text);
    }
    if channel == Channel::sms {
        return Err(format!("renders to {n} {unit}, the limit is {limit}"));
    }
    let mut cut: String = text.chars().take(limit - 1).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    Ok(cut)
}

/// SMS segments: GSM-7 text takes 160 characters in one segment and 153 per segment
/// when split; anything outside GSM-7 is UCS-2, 70 and 67.
pub fn sms_segments(text: &str) -> usize {
    const GSM7: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const GSM7_EXTENDED: &str = "^{}\\[~]|€\u{c}";
    // Units per character: GSM-7 septets (an extended character is an escape and
    // itself), else UTF-16 code units (a character beyond the BMP is a pair).
    let gsm_units = |c: char| {
        if GSM7.contains(c) {
            Some(1)
        } else if GSM7_EXTENDED.contains(c) {
            Some(2)
        } else {
            None
        }
    };
    let gsm = text.chars().all(|c| gsm_units(c).is_some());
    let units = |c: char| match gsm {
        true => gsm_units(c).unwrap_or(1),
        false => c.len_utf16(),
    };
    let (single, multi) = if gsm { (160, 153) } else { (70, 67) };
    let total: usize = text.chars().map(units).sum();
    if total <= single {
        return usize::from(total > 0);
    }
    // Split: a character's units never straddle two segments (an escape and its
    // character, a surrogate pair), so a segment may end a unit short.
    let (mut segments, mut used) = (1, 0);
    for c in text.chars() {
        let n = units(c);
        if used + n > multi {
            segments += 1;
            used = 0;
        }
        used += n;
    }
    segments
}

/// `value` with every object field that is null or blank text left out, in nested
/// objects and in the objects of arrays too: a catalog's empty product name is no name,
/// and must fail or take its default rather than render " is now 0.30".
fn without_nulls(value: &serde_json::Value) -> serde_json::Value {
    let missing = |v: &serde_json::Value| match v {
        serde_json::Value::Null => true,
        serde_json::Value::String(text) => text.trim().is_empty(),
        _ => false,
    };
    match value {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .filter(|(_, v)| !missing(v))
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(without_nulls).collect())
        }
        other => other.clone(),
    }
}

/// Whether template text `line` uses the name `name` (as a whole word).
fn uses_name(line: &str, name: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(name).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + name.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(channel: Channel, files: &[(&str, &str)]) -> Result<TemplateSet, TemplateError> {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write template");
        }
        TemplateSet::load(dir.path(), channel)
    }

    const CART: &str = r#"
[email]
subject = "{{ first_name }}, your cart is waiting"
preheader = "{{ cart_items | length }} items, {{ cart_value }} EUR"
body = "Hello {{ first_name }}!{% for i in cart_items %} {{ i.product_id }}{% endfor %}"
[sms]
text = "{{ first_name | default('Hi') }}, your cart is waiting"
"#;

    #[test]
    fn renders_with_the_trigger_variables() {
        let t = set(Channel::email, &[("cart.toml", CART)]).unwrap();
        let m = t
            .render(
                "cart",
                &serde_json::json!({"first_name": "Anna", "cart_items": [{"product_id": "p1"}], "cart_value": 59.9}),
            )
            .unwrap();
        assert_eq!(m.subject.as_deref(), Some("Anna, your cart is waiting"));
        assert_eq!(m.preheader.as_deref(), Some("1 items, 59.9 EUR"));
        assert_eq!(m.body, "Hello Anna! p1");
    }

    #[test]
    fn a_missing_or_null_variable_fails_instead_of_rendering_blank() {
        let t = set(Channel::email, &[("cart.toml", CART)]).unwrap();
        for vars in [
            serde_json::json!({"cart_items": [], "cart_value": 1}),
            serde_json::json!({"first_name": null, "cart_items": [], "cart_value": 1}),
        ] {
            let err = t.render("cart", &vars).unwrap_err();
            assert!(
                matches!(
                    &err,
                    TemplateError::Render {
                        field: "subject",
                        ..
                    }
                ),
                "{err}"
            );
        }
        // The error quotes what had no value, not the optional variables beside it.
        let err = t
            .render(
                "cart",
                &serde_json::json!({"cart_items": [], "cart_value": 1}),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing variable first_name"), "{err}");
        // A missing list is named, not only the filter it went through.
        let err = t
            .render(
                "cart",
                &serde_json::json!({"first_name": "Ann", "cart_value": 1}),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing variable cart_items"), "{err}");
        assert!(uses_name("{{ cart_items | length }}", "cart_items"));
        assert!(!uses_name("{{ cart_items_count }}", "cart_items"));
        // A field missing in a list item is named as the template reads it.
        let cart = include_str!("../../../config/templates/abandoned_cart.toml");
        let shipped_cart = set(Channel::email, &[("abandoned_cart.toml", cart)]).unwrap();
        let err = shipped_cart
            .render(
                "abandoned_cart",
                &serde_json::json!({"cart_items": [{"product_id": "p1"}], "cart_value": 5}),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("quantity"), "{err}");
        assert!(
            !err.contains("first_name"),
            "an optional variable named: {err}"
        );
        // A null inside a cart item is missing too: the item's default applies.
        let shipped = set(
            Channel::email,
            &[(
                "abandoned_cart.toml",
                include_str!("../../../config/templates/abandoned_cart.toml"),
            )],
        )
        .unwrap();
        let m = shipped
            .render(
                "abandoned_cart",
                &serde_json::json!({"cart_items": [{"product_id": "p1", "name": null, "quantity": 1}], "cart_value": 5}),
            )
            .unwrap();
        assert!(m.body.contains("- p1 x 1"), "{}", m.body);
        assert!(!m.body.contains("none"), "{}", m.body);
        // An optional variable with a default renders.
        let sms = set(Channel::sms, &[("cart.toml", CART)]).unwrap();
        let m = sms.render("cart", &serde_json::json!({})).unwrap();
        assert_eq!(m.body, "Hi, your cart is waiting");
    }

    /// The shipped review request lists the order's items, and renders without them
    /// (a follow-up an older order took back after a return carries none).
    #[test]
    fn the_review_request_names_the_items_bought_when_it_has_them() {
        let shipped = set(
            Channel::email,
            &[(
                "review_request.toml",
                include_str!("../../../config/templates/review_request.toml"),
            )],
        )
        .unwrap();
        let items = serde_json::json!({"order_id": "o-1", "order_items": [
            {"product_id": "p-mug", "name": "Mug", "quantity": 2, "unit_price": 12.5},
            {"product_id": "p-kettle", "quantity": 1, "unit_price": 40.0}]});
        let m = shipped.render("review_request", &items).unwrap();
        assert!(m.body.contains("- Mug\n- p-kettle\n"), "{}", m.body);
        let m = shipped
            .render("review_request", &serde_json::json!({"order_id": "o-1"}))
            .unwrap();
        assert!(
            m.body.contains("how was your order?\n\nLeave a review"),
            "{}",
            m.body
        );
    }

    #[test]
    fn amounts_render_with_two_decimals() {
        let cart = include_str!("../../../config/templates/abandoned_cart.toml");
        let drop = include_str!("../../../config/templates/price_drop.toml");
        let shipped = set(
            Channel::email,
            &[("abandoned_cart.toml", cart), ("price_drop.toml", drop)],
        )
        .unwrap();
        let vars = serde_json::json!({"cart_items": [{"product_id": "p1", "quantity": 1}],
            "cart_value": 10});
        let m = shipped.render("abandoned_cart", &vars).unwrap();
        assert!(m.body.contains("Total: 10.00\n"), "{}", m.body);
        let vars = serde_json::json!({"product_id": "p1", "product_name": "Mug",
            "old_price": 59.9, "new_price": 0.1 + 0.2});
        let m = shipped.render("price_drop", &vars).unwrap();
        assert_eq!(m.subject.as_deref(), Some("Mug is now 0.30"));
        assert_eq!(m.preheader.as_deref(), Some("Was 59.90"));
        assert!(!m.body.contains("Lowest"), "{}", m.body);
    }

    /// A drop states the lowest price of the 30 days before it (the EU's Omnibus
    /// directive), in the e-mail of a price drop and of a return to stock at a lower
    /// price; a return without a drop states none.
    #[test]
    fn a_drop_states_the_lowest_price_of_the_30_days_before_it() {
        let drop = include_str!("../../../config/templates/price_drop.toml");
        let stock = include_str!("../../../config/templates/back_in_stock.toml");
        let shipped = set(
            Channel::email,
            &[("price_drop.toml", drop), ("back_in_stock.toml", stock)],
        )
        .unwrap();
        let lowest = "\nLowest price in the 30 days before: 75.00\n";
        let vars = serde_json::json!({"product_id": "p1", "old_price": 100,
            "new_price": 80, "lowest_price": 75});
        for template in ["price_drop", "back_in_stock"] {
            let m = shipped.render(template, &vars).unwrap();
            assert!(m.body.contains(lowest), "{template}: {}", m.body);
        }
        let vars = serde_json::json!({"product_id": "p1", "old_price": null,
            "new_price": 80, "lowest_price": 75});
        let m = shipped.render("back_in_stock", &vars).unwrap();
        assert!(!m.body.contains("Lowest"), "{}", m.body);
    }

    /// A return to stock at a lower price tells the drop (the wisher hears of it only
    /// there); at the same price, or with no price, it tells the return alone.
    #[test]
    fn back_in_stock_at_a_lower_price_tells_the_drop() {
        let stock = include_str!("../../../config/templates/back_in_stock.toml");
        for channel in [Channel::email, Channel::sms, Channel::push] {
            let shipped = set(channel, &[("back_in_stock.toml", stock)]).unwrap();
            let text = |vars: serde_json::Value| {
                let m = shipped.render("back_in_stock", &vars).unwrap();
                format!("{} {}", m.subject.unwrap_or_default(), m.body)
            };
            let dropped = text(
                serde_json::json!({"product_id": "p1", "product_name": "Mug",
                "old_price": 100, "new_price": 80}),
            );
            assert!(
                dropped.contains("80.00") && dropped.contains("100.00"),
                "{channel:?}: {dropped}"
            );
            for vars in [
                serde_json::json!({"product_id": "p1", "product_name": "Mug",
                    "old_price": 80, "new_price": 80}),
                serde_json::json!({"product_id": "p1", "product_name": "Mug"}),
                // A return without a drop: the profile passes no old price.
                serde_json::json!({"product_id": "p1", "product_name": "Mug",
                    "old_price": null, "new_price": 80}),
            ] {
                let same = text(vars);
                assert!(
                    same.contains("back in stock")
                        && !same.contains("(was")
                        && !same.contains("dropped"),
                    "{channel:?}: {same}"
                );
            }
        }
    }

    /// A blank name is no name: the default applies (a price drop of a product the
    /// catalog names "" reads "An item you viewed is now 0.30", not " is now 0.30"), and a blank
    /// required variable fails like a missing one.
    #[test]
    fn a_blank_variable_is_missing() {
        let drop = include_str!("../../../config/templates/price_drop.toml");
        let shipped = set(Channel::email, &[("price_drop.toml", drop)]).unwrap();
        let vars = serde_json::json!({"product_id": "p1", "product_name": " ",
            "old_price": 59.9, "new_price": 0.3});
        let m = shipped.render("price_drop", &vars).unwrap();
        assert_eq!(m.subject.as_deref(), Some("An item you viewed is now 0.30"));
        assert!(m.body.contains("p1 dropped from 59.90"), "{}", m.body);
        let t = set(Channel::email, &[("cart.toml", CART)]).unwrap();
        let vars = serde_json::json!({"first_name": "", "cart_items": [], "cart_value": 1});
        assert!(t.render("cart", &vars).is_err());
    }

    /// Ids go into the shipped links as one path segment each, whatever they hold.
    #[test]
    fn ids_in_links_are_percent_encoded() {
        let stock = include_str!("../../../config/templates/back_in_stock.toml");
        let shipped = set(Channel::email, &[("back_in_stock.toml", stock)]).unwrap();
        let vars = serde_json::json!({"product_id": "SKU 12/RED#2", "product_name": "Mug"});
        let m = shipped.render("back_in_stock", &vars).unwrap();
        assert!(
            m.body
                .contains("https://shop.example/p/SKU%2012%2FRED%232\n"),
            "{}",
            m.body
        );
        assert_eq!(url_part("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(url_part("Bücher?x=1"), "B%C3%BCcher%3Fx%3D1");
    }

    #[test]
    fn static_text_over_a_channel_limit_is_a_load_error_naming_file_and_field() {
        let long = "x".repeat(PUSH_TEXT_MAX_CHARS + 1);
        let err = set(
            Channel::push,
            &[(
                "promo.toml",
                &format!("[push]\ntext = \"{{{{ first_name }}}} {long}\"\n"),
            )],
        )
        .err()
        .expect("too long");
        let text = err.to_string();
        assert!(text.contains("promo.toml"), "{text}");
        assert!(text.contains("[push] text"), "{text}");
        assert!(text.contains("limit is 178"), "{text}");
    }

    #[test]
    fn rendered_text_over_the_limit_is_cut_to_fit_except_an_sms() {
        let t = set(
            Channel::push,
            &[(
                "p.toml",
                "[push]\ntitle = \"Still thinking about {{ name }}?\"\ntext = \"{{ name }}\"\n",
            )],
        )
        .unwrap();
        let name = "Trail running shoe, waterproof, size 42 wide, ré".repeat(4);
        let m = t.render("p", &serde_json::json!({"name": name})).unwrap();
        let title = m.subject.expect("title");
        assert_eq!(title.chars().count(), PUSH_TITLE_MAX_CHARS, "{title}");
        assert!(title.starts_with("Still thinking about Trail") && title.ends_with('…'));
        assert_eq!(m.body.chars().count(), PUSH_TEXT_MAX_CHARS);
        let sms = set(
            Channel::sms,
            &[("s.toml", "[sms]\ntext = \"{{ name }}\"\n")],
        )
        .unwrap();
        let err = sms
            .render("s", &serde_json::json!({"name": "y".repeat(500)}))
            .unwrap_err();
        assert!(err.to_string().contains("the limit is 3"), "{err}");
    }

    #[test]
    fn sms_segments_follow_gsm7_and_ucs2() {
        assert_eq!(sms_segments(&"a".repeat(160)), 1);
        assert_eq!(sms_segments(&"a".repeat(161)), 2);
        assert_eq!(sms_segments(&"a".repeat(306)), 2);
        assert_eq!(
            sms_segments(&"€".repeat(80)),
            1,
            "extended chars take two units"
        );
        assert_eq!(sms_segments(&"я".repeat(70)), 1);
        assert_eq!(sms_segments(&"я".repeat(71)), 2);
        // 459 septets fill three segments of 153 exactly, but the escaped "€" cannot
        // be split across the first two: four.
        let straddling = format!("{}€{}", "a".repeat(152), "a".repeat(305));
        assert_eq!(sms_segments(&straddling), 4);
        assert_eq!(
            sms_segments(&format!("{}€{}", "a".repeat(151), "a".repeat(306))),
            3
        );
        // Likewise a surrogate pair in UCS-2: 66 units, then an emoji (2), then 66.
        let pair = format!("{}😀{}", "я".repeat(66), "я".repeat(66));
        assert_eq!(sms_segments(&pair), 3);
        assert_eq!(
            sms_segments(&format!("{}😀{}", "я".repeat(65), "я".repeat(67))),
            2
        );
    }

    #[test]
    fn a_template_without_the_channel_is_reported() {
        let t = set(Channel::push, &[("cart.toml", CART)]).unwrap();
        assert!(!t.contains("cart"));
        let err = t.render("cart", &serde_json::json!({})).unwrap_err();
        assert!(matches!(err, TemplateError::MissingChannel { .. }));
    }

    #[test]
    fn static_text_drops_expressions_and_tags() {
        assert_eq!(
            static_text("Hi {{ a }}!{% if b %} x{% endif %}{# c #}"),
            "Hi ! x"
        );
    }
}
