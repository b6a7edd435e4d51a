//! Deterministic ids: the same inputs always give the same id, also on replay and after
//! a crash, so every consumer can deduplicate by id.

use sha2::{Digest, Sha256};

/// A 128-bit hex id derived from `parts` (separated so that ("ab","c") != ("a","bc")).
pub fn deterministic_id(parts: &[&str]) -> String {
    // By hand rather than `hex::encode`, which collects an iterator of chars (ids are
    // made several times per record).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in &digest(parts)[..16] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    id
}

/// A stable number in [0, 1) derived from `parts`: for control groups and the
/// simulator's draws, identical on every instance and every run.
pub fn stable_fraction(parts: &[&str]) -> f64 {
    let d = digest(parts);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A stable 64-bit hash of a string (FNV-1a): cheap, for in-state deduplication.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// A number this run of this process alone has (the start time in nanoseconds, mixed
/// with the process id): the one thing not deterministic here, for what must differ
/// between runs (a live generator's ids, the touches a feedback process counted).
pub fn run_nonce() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}

/// Whether two secrets (a presented token and the configured one) are the same,
/// compared through their SHA-256 digests: how long the comparison takes says nothing
/// about how much of the secret a guess got right.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    use sha2::Digest as _;
    sha2::Sha256::digest(presented.as_bytes()) == sha2::Sha256::digest(expected.as_bytes())
}

use hmac::Mac as _;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The token the site or app presents to poll `customer_id`'s in-app inbox
/// (`delivery.in_app.inbox_secret`): HMAC-SHA256 of the customer id under the secret,
/// in lower-case hex. The shop's backend, which knows who is logged in, hands it to
/// the page or app, so one customer cannot read another's inbox (the scheme of
/// Intercom's identity verification).
pub fn inbox_token(secret: &str, customer_id: &str) -> String {
    hex::encode(inbox_mac(secret, customer_id).finalize().into_bytes())
}

/// Whether `presented` is `customer_id`'s inbox token under `secret` (compared in
/// constant time).
pub fn is_inbox_token(secret: &str, customer_id: &str, presented: &str) -> bool {
    hex::decode(presented.trim())
        .is_ok_and(|bytes| inbox_mac(secret, customer_id).verify_slice(&bytes).is_ok())
}

fn inbox_mac(secret: &str, customer_id: &str) -> HmacSha256 {
    mac_of(secret, &[customer_id])
}

/// The token an unsubscribe link carries (`{token}` in `list_unsubscribe`, under
/// `delivery.<channel>.unsubscribe_secret`): HMAC-SHA256 of the customer id, a line
/// feed and the send id under the secret, in lower-case hex. The shop's unsubscribe
/// endpoint computes it again and takes the request only when it matches: without it,
/// anyone who reads one message's link could unsubscribe every customer by their ids.
pub fn unsubscribe_token(secret: &str, customer_id: &str, send_id: &str) -> String {
    hex::encode(
        mac_of(secret, &[customer_id, "\n", send_id])
            .finalize()
            .into_bytes(),
    )
}

fn mac_of(secret: &str, parts: &[&str]) -> HmacSha256 {
    // HMAC takes a key of any length.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    for part in parts {
        mac.update(part.as_bytes());
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_separated() {
        assert_eq!(deterministic_id(&["a", "b"]), deterministic_id(&["a", "b"]));
        assert_ne!(
            deterministic_id(&["ab", "c"]),
            deterministic_id(&["a", "bc"])
        );
        assert_eq!(deterministic_id(&["x"]).len(), 32);
    }

    #[test]
    fn ids_are_the_hex_of_the_digest_as_they_always_were() {
        // Ids must not change between versions: a replay after an upgrade must give
        // the ids the outputs already carry.
        for parts in [&["t-1", "email"][..], &["e9", "visit"], &[""]] {
            assert_eq!(deterministic_id(parts), hex::encode(&digest(parts)[..16]));
        }
        // SHA-256 over (length, bytes) of each part, first 16 bytes in hex.
        assert_eq!(
            deterministic_id(&["a", "b"]),
            "3c9d591045bc8876f9d0399bbfb05c6a"
        );
    }

    #[test]
    fn fractions_are_uniform_enough() {
        let n = 20_000;
        let below: usize = (0..n)
            .filter(|i| stable_fraction(&["c", &i.to_string()]) < 0.1)
            .count();
        let share = below as f64 / n as f64;
        assert!((0.09..0.11).contains(&share), "share {share}");
    }

    /// RFC 4231, test case 2: the token is plain HMAC-SHA256, which any backend can
    /// compute.
    #[test]
    fn the_inbox_token_is_hmac_sha256_in_hex() {
        let token = inbox_token("Jefe", "what do ya want for nothing?");
        assert_eq!(
            token,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(is_inbox_token(
            "Jefe",
            "what do ya want for nothing?",
            &token
        ));
        assert!(is_inbox_token(
            "Jefe",
            "what do ya want for nothing?",
            &token.to_uppercase()
        ));
        assert!(!is_inbox_token("Jefe", "another customer", &token));
        assert!(!is_inbox_token(
            "other",
            "what do ya want for nothing?",
            &token
        ));
        assert!(!is_inbox_token(
            "Jefe",
            "what do ya want for nothing?",
            &token[..62]
        ));
        assert!(!is_inbox_token(
            "Jefe",
            "what do ya want for nothing?",
            "not hex"
        ));
    }
}
