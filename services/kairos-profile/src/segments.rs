//! RFM and lifecycle segmentation, and when a customer's segment will next change by
//! the passing of time alone.

use kairos_core::config::{LifecycleConfig, RfmConfig, SegmentsConfig};
use kairos_core::time::{Millis, DAY};

use crate::profile::{CustomerProfile, RfmScore};

/// Whether the customer has an order that counts: a cancellation uncounts its order
/// but leaves the purchase times, so a customer whose only order was cancelled is
/// no buyer.
fn bought(p: &CustomerProfile) -> bool {
    p.orders > 0
}

/// RFM scores and cell; `None` for customers who never bought (or whose every order
/// was cancelled).
pub fn rfm(cfg: &RfmConfig, p: &CustomerProfile, now: Millis) -> Option<RfmScore> {
    let last = p.last_purchase_at.filter(|_| bought(p))?;
    let days = (now - last).max(0) / DAY;
    let r = 5 - cfg
        .recency_days
        .iter()
        .take_while(|&&d| days >= i64::from(d))
        .count() as u8;
    let f = 1 + cfg
        .frequency_orders
        .iter()
        .take_while(|&&o| p.orders >= o)
        .count() as u8;
    // A sum of prices may fall just short of a boundary it equals.
    let revenue = kairos_core::contracts::round_money(p.revenue);
    let m = 1 + cfg.monetary.iter().take_while(|&&v| revenue >= v).count() as u8;
    let within = |x: u8, range: [u8; 2]| range[0] <= x && x <= range[1];
    let segment = cfg
        .cells
        .iter()
        .find(|c| within(r, c.r) && within(f, c.f) && within(m, c.m))
        .map(|c| c.name.clone())
        .unwrap_or_else(|| cfg.default_segment.clone());
    Some(RfmScore { r, f, m, segment })
}

/// Every lifecycle stage `lifecycle` can return (in the configuration crate, which
/// checks the stages `segment_entered` scenarios name).
pub use kairos_core::config::LIFECYCLE_STAGES;

/// Lifecycle stage: prospect, new, regular, dormant or churned.
pub fn lifecycle(cfg: &LifecycleConfig, p: &CustomerProfile, now: Millis) -> String {
    let (Some(first), Some(last), true) = (p.first_purchase_at, p.last_purchase_at, bought(p))
    else {
        return "prospect".into();
    };
    let since_last = now - last;
    if since_last >= i64::from(cfg.churn_days) * DAY {
        "churned".into()
    } else if since_last >= i64::from(cfg.active_days) * DAY {
        "dormant".into()
    } else if p.orders <= 1 && now - first < i64::from(cfg.new_days) * DAY {
        "new".into()
    } else {
        "regular".into()
    }
}

/// The earliest moment after `now` at which time alone changes the RFM score or the
/// lifecycle stage.
pub fn next_boundary(cfg: &SegmentsConfig, p: &CustomerProfile, now: Millis) -> Option<Millis> {
    let last = p.last_purchase_at.filter(|_| bought(p))?;
    let mut candidates: Vec<Millis> = cfg
        .rfm
        .recency_days
        .iter()
        .map(|&d| last + i64::from(d) * DAY)
        .collect();
    candidates.push(last + i64::from(cfg.lifecycle.active_days) * DAY);
    candidates.push(last + i64::from(cfg.lifecycle.churn_days) * DAY);
    if let (Some(first), true) = (p.first_purchase_at, p.orders <= 1) {
        candidates.push(first + i64::from(cfg.lifecycle.new_days) * DAY);
    }
    candidates.into_iter().filter(|&t| t > now).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buyer(orders: u32, revenue: f64, last: Millis) -> CustomerProfile {
        CustomerProfile {
            orders,
            revenue,
            first_purchase_at: Some(last - 400 * DAY),
            last_purchase_at: Some(last),
            ..Default::default()
        }
    }

    #[test]
    fn scores_follow_the_boundaries() {
        let cfg = RfmConfig::default();
        let now = 1000 * DAY;
        let s = rfm(&cfg, &buyer(12, 1500.0, now - 5 * DAY), now).unwrap();
        assert_eq!((s.r, s.f, s.m), (5, 5, 5));
        assert_eq!(s.segment, "Champions");
        let s = rfm(&cfg, &buyer(12, 1500.0, now - 200 * DAY), now).unwrap();
        assert_eq!(s.r, 2);
        assert_eq!(s.segment, "Big Spenders");
        let s = rfm(&cfg, &buyer(6, 300.0, now - 200 * DAY), now).unwrap();
        assert_eq!((s.r, s.f, s.m), (2, 4, 3));
        assert_eq!(s.segment, "At Risk");
        let s = rfm(&cfg, &buyer(1, 20.0, now - 400 * DAY), now).unwrap();
        assert_eq!(s.segment, "Hibernating");
        assert!(rfm(&cfg, &CustomerProfile::default(), now).is_none());
    }

    #[test]
    fn lifecycle_moves_with_time() {
        let cfg = LifecycleConfig::default();
        let mut p = buyer(1, 50.0, 0);
        p.first_purchase_at = Some(0);
        assert_eq!(lifecycle(&cfg, &p, DAY), "new");
        assert_eq!(lifecycle(&cfg, &p, 31 * DAY), "regular");
        assert_eq!(lifecycle(&cfg, &p, 90 * DAY), "dormant");
        assert_eq!(lifecycle(&cfg, &p, 365 * DAY), "churned");
        assert_eq!(lifecycle(&cfg, &CustomerProfile::default(), 0), "prospect");
    }

    #[test]
    fn next_boundary_is_the_first_future_threshold() {
        let cfg = SegmentsConfig::default();
        let mut p = buyer(1, 50.0, 0);
        p.first_purchase_at = Some(0);
        assert_eq!(next_boundary(&cfg, &p, DAY), Some(30 * DAY));
        assert_eq!(next_boundary(&cfg, &p, 30 * DAY), Some(90 * DAY));
        assert_eq!(next_boundary(&cfg, &p, 365 * DAY), None);
    }
}
