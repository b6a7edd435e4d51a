//! Customer identifiers and their normal form, so that `Ann@Example.com ` and
//! `ann@example.com`, or `8 (916) 123-45-67` and `+79161234567`, are one identifier.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kinds of identifier an event can carry.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IdentifierKind {
    customer_id,
    email,
    phone,
    loyalty_card,
    device_id,
    anonymous_id,
}

impl IdentifierKind {
    pub const ALL: [IdentifierKind; 6] = [
        IdentifierKind::customer_id,
        IdentifierKind::email,
        IdentifierKind::phone,
        IdentifierKind::loyalty_card,
        IdentifierKind::device_id,
        IdentifierKind::anonymous_id,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdentifierKind::customer_id => "customer_id",
            IdentifierKind::email => "email",
            IdentifierKind::phone => "phone",
            IdentifierKind::loyalty_card => "loyalty_card",
            IdentifierKind::device_id => "device_id",
            IdentifierKind::anonymous_id => "anonymous_id",
        }
    }
}

/// A normalized identifier: `email:ann@example.com`, `phone:+79161234567`, ...
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: IdentifierKind,
    pub value: String,
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {value:?} ({reason})")]
pub struct InvalidIdentifier {
    pub kind: &'static str,
    pub value: String,
    pub reason: String,
}

/// The longest customer, anonymous or device id accepted.
pub const MAX_KEY_BYTES: usize = 200;

/// A customer, anonymous or device id as the key of state: trimmed, without control
/// characters, at most [`MAX_KEY_BYTES`]; else why not.
pub fn key_id(raw: &str) -> Result<&str, &'static str> {
    let trimmed = raw.trim();
    if trimmed.chars().any(char::is_control) || trimmed.len() > MAX_KEY_BYTES {
        return Err("control characters or longer than 200 bytes");
    }
    Ok(trimmed)
}

/// Whether an anonymous or device id is a placeholder that SDKs and tag managers send
/// for visitors without one ("undefined", "null", the all-zero advertising id of a
/// device that limits tracking): shared by every such visitor, it would join
/// strangers into one profile, their contacts and carts together.
pub fn is_placeholder_id(value: &str) -> bool {
    const PLACEHOLDERS: [&str; 9] = [
        "undefined",
        "null",
        "nil",
        "none",
        "(null)",
        "unknown",
        "n/a",
        "[object object]",
        "-1",
    ];
    let value = value.trim();
    PLACEHOLDERS.iter().any(|p| value.eq_ignore_ascii_case(p))
        || (!value.is_empty() && (value.chars()).all(|c| c == '0' || c == '-' || c.is_whitespace()))
}

/// Normalizes identifiers; phones without a country code are read as numbers of
/// `default_country`.
#[derive(Debug, Clone)]
pub struct Normalizer {
    default_country: phonenumber::country::Id,
}

/// Parses an ISO 3166 region code such as `DE` for phone numbers.
pub fn parse_country(code: &str) -> Result<phonenumber::country::Id, String> {
    code.trim()
        .to_ascii_uppercase()
        .parse::<phonenumber::country::Id>()
        .map_err(|_| format!("{code:?} is not an ISO 3166 region code such as \"DE\""))
}

/// Whether two addresses name the same mailbox, where one of them may be stored in an
/// earlier spelling: an e-mail's Unicode domain before addresses were normalized to
/// the ASCII (IDNA) form. Plain string equality for ASCII addresses (the hot path).
pub fn same_address(a: &str, b: &str) -> bool {
    a == b || ((!a.is_ascii() || !b.is_ascii()) && ascii_email(a) == ascii_email(b))
}

/// `address` with its e-mail domain in the ASCII form and lower case, if it has one.
fn ascii_email(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let domain = ascii_domain(domain).unwrap_or_else(|_| domain.to_lowercase());
            format!("{}@{domain}", local.to_lowercase())
        }
        None => address.to_string(),
    }
}

/// An e-mail domain in its ASCII (IDNA) form, lower-cased, as DNS and the SMTP worker
/// name it: "bücher.de" is "xn--bcher-kva.de". A domain literal ("[192.0.2.1]") is no
/// name and stays as it is.
pub fn ascii_domain(domain: &str) -> Result<String, idna::Errors> {
    if domain.starts_with('[') {
        return Ok(domain.to_string());
    }
    idna::domain_to_ascii(domain)
}

impl Normalizer {
    pub fn new(default_country: &str) -> Result<Self, String> {
        Ok(Normalizer {
            default_country: parse_country(default_country)?,
        })
    }

    pub fn normalize(
        &self,
        kind: IdentifierKind,
        raw: &str,
    ) -> Result<Identifier, InvalidIdentifier> {
        let invalid = |reason: &str| InvalidIdentifier {
            kind: kind.as_str(),
            value: raw.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(invalid("empty"));
        }
        let value = match kind {
            IdentifierKind::email => {
                // The address alone: a form that keeps "Ann Lee <ann@example.com>" names
                // the same mailbox as one that keeps "ann@example.com".
                let parsed = email_address::EmailAddress::parse_with_options(
                    trimmed,
                    email_address::Options::default(),
                )
                .map_err(|e| invalid(&format!("not an e-mail address: {e}")))?;
                if !parsed.domain().contains('.') {
                    return Err(invalid("not an e-mail address: no dot in the domain"));
                }
                // "anna@bücher.de" and "anna@xn--bcher-kva.de" are one mailbox.
                let domain = ascii_domain(parsed.domain()).map_err(|_| {
                    invalid("not an e-mail address: the domain is not a valid IDNA name")
                })?;
                format!("{}@{domain}", parsed.local_part().to_lowercase())
            }
            IdentifierKind::phone => {
                let number = phonenumber::parse(Some(self.default_country), trimmed)
                    .map_err(|e| invalid(&format!("not a phone number: {e}")))?;
                if !phonenumber::is_valid(&number) {
                    return Err(invalid("not a valid number for its country"));
                }
                number.format().mode(phonenumber::Mode::E164).to_string()
            }
            // Cards are printed with spaces and dashes; the digits and letters count.
            IdentifierKind::loyalty_card => {
                let card: String = trimmed
                    .chars()
                    .filter(|c| !c.is_whitespace() && *c != '-')
                    .flat_map(char::to_uppercase)
                    .collect();
                if !card.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(invalid("a loyalty card has letters and digits only"));
                }
                // "-" would otherwise become the card "" that every such receipt shares.
                if card.is_empty() {
                    return Err(invalid("a loyalty card needs at least one letter or digit"));
                }
                if card.len() > MAX_KEY_BYTES {
                    return Err(invalid("a loyalty card longer than 200 characters"));
                }
                card
            }
            IdentifierKind::customer_id
            | IdentifierKind::device_id
            | IdentifierKind::anonymous_id => key_id(trimmed).map_err(invalid)?.to_string(),
        };
        Ok(Identifier { kind, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> Normalizer {
        Normalizer::new("RU").unwrap()
    }

    #[test]
    fn placeholders_are_told_from_ids() {
        for placeholder in [
            "undefined",
            " NULL ",
            "(null)",
            "00000000-0000-0000-0000-000000000000",
            "0",
            "0000 0000",
            "[object Object]",
        ] {
            assert!(is_placeholder_id(placeholder), "{placeholder:?}");
        }
        for id in ["0a1b-2c", "user-0", "10", "0 1", "nullable-7", "-", ""] {
            let expected = id == "-";
            assert_eq!(is_placeholder_id(id), expected, "{id:?}");
        }
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        let id = n()
            .normalize(IdentifierKind::email, "  Ann.Lee@Example.COM ")
            .unwrap();
        assert_eq!(id.to_string(), "email:ann.lee@example.com");
        assert!(n().normalize(IdentifierKind::email, "ann@").is_err());
        assert!(n()
            .normalize(IdentifierKind::email, "not an email")
            .is_err());
        assert!(n()
            .normalize(IdentifierKind::email, "ann@localhost")
            .is_err());
        assert!(n()
            .normalize(IdentifierKind::email, "a.b@localhost")
            .is_err());
        let named = n()
            .normalize(IdentifierKind::email, "Ann Lee <Ann.Lee@Example.com>")
            .unwrap();
        assert_eq!(named.to_string(), "email:ann.lee@example.com");
        for unicode in ["anna@bücher.de", "Anna@BÜCHER.de", "anna@xn--bcher-kva.de"] {
            let id = n().normalize(IdentifierKind::email, unicode).unwrap();
            assert_eq!(id.value, "anna@xn--bcher-kva.de", "{unicode}");
        }
        assert!(same_address("anna@bücher.de", "anna@xn--bcher-kva.de"));
        assert!(same_address("Anna@Bücher.de", "anna@xn--bcher-kva.de"));
        assert!(!same_address("anna@bücher.de", "anna@buecher.de"));
        assert!(!same_address("+491701234567", "+491701234568"));
        // A Unicode local part stays as it is (lower-cased).
        let local = n()
            .normalize(IdentifierKind::email, "Иван@example.com")
            .unwrap();
        assert_eq!(local.value, "иван@example.com");
    }

    #[test]
    fn phones_become_e164_with_the_default_country() {
        let n = n();
        for raw in [
            "8 (916) 123-45-67",
            "+7 916 123 45 67",
            "9161234567",
            " +79161234567",
        ] {
            let id = n.normalize(IdentifierKind::phone, raw).unwrap();
            assert_eq!(id.value, "+79161234567", "{raw}");
        }
        // A number with its own country code keeps it.
        let de = n.normalize(IdentifierKind::phone, "+49 30 901820").unwrap();
        assert_eq!(de.value, "+4930901820");
        let us = Normalizer::new("us").unwrap();
        assert_eq!(
            us.normalize(IdentifierKind::phone, "(201) 555-0123")
                .unwrap()
                .value,
            "+12015550123"
        );
        for bad in ["12", "call me", "+7 000"] {
            let e = n.normalize(IdentifierKind::phone, bad).unwrap_err();
            assert_eq!(e.kind, "phone", "{bad}");
        }
    }

    #[test]
    fn cards_and_ids() {
        let n = n();
        assert_eq!(
            n.normalize(IdentifierKind::loyalty_card, "ab-1234 5678")
                .unwrap()
                .value,
            "AB12345678"
        );
        assert!(n.normalize(IdentifierKind::loyalty_card, "12#4").is_err());
        let longest = "7".repeat(200);
        assert_eq!(
            n.normalize(IdentifierKind::loyalty_card, &longest)
                .map(|c| c.value),
            Ok(longest)
        );
        assert!(n
            .normalize(IdentifierKind::loyalty_card, &"A".repeat(201))
            .is_err());
        // Nothing left to identify anyone by: not one card shared by every such receipt.
        for blank in ["-", "- -", " - "] {
            let e = n
                .normalize(IdentifierKind::loyalty_card, blank)
                .unwrap_err();
            assert!(e.reason.contains("at least one"), "{blank:?}: {e:?}");
        }
        assert_eq!(
            n.normalize(IdentifierKind::customer_id, " c-1 ")
                .unwrap()
                .value,
            "c-1"
        );
        assert!(n.normalize(IdentifierKind::device_id, "").is_err());
        assert!(n
            .normalize(IdentifierKind::anonymous_id, "a\u{0}b")
            .is_err());
    }

    #[test]
    fn unknown_countries_are_refused() {
        assert!(Normalizer::new("Narnia").is_err());
        assert!(Normalizer::new("de").is_ok());
    }
}
