//! A simulated provider with realistic delivery and engagement rates.
//!
//! Every draw is a stable function of the send id, so a replay produces the same
//! outcomes and the metrics have the shapes real campaigns have.

use kairos_core::config::SimulatorConfig;
use kairos_core::contracts::OutcomeKind;
use kairos_core::ids::stable_fraction;
use kairos_core::time::Millis;

/// The outcomes of one send after "sent", with the time each happens.
pub fn plan(cfg: &SimulatorConfig, send_id: &str, now: Millis) -> Vec<(OutcomeKind, Millis)> {
    let draw = |what: &str| stable_fraction(&[send_id, what]);
    let mut out = Vec::new();
    if draw("deliver") >= cfg.delivery_rate {
        let kind = if draw("bounce") < cfg.hard_bounce_rate / (1.0 - cfg.delivery_rate).max(1e-9) {
            OutcomeKind::bounced_hard
        } else {
            OutcomeKind::bounced_soft
        };
        out.push((kind, now));
        return out;
    }
    out.push((OutcomeKind::delivered, now));
    let min = cfg.engagement_delay_min.as_millis() as Millis;
    let max = (cfg.engagement_delay_max.as_millis() as Millis).max(min);
    let delay = |what: &str| min + ((max - min) as f64 * draw(what)) as Millis;
    if draw("open") < cfg.open_rate {
        let opened_at = now + delay("open_at");
        out.push((OutcomeKind::opened, opened_at));
        if draw("click") < cfg.click_to_open_rate {
            out.push((OutcomeKind::clicked, opened_at + delay("click_at") / 10));
        }
        if draw("unsubscribe") < cfg.unsubscribe_rate / cfg.open_rate.max(1e-9) {
            out.push((
                OutcomeKind::unsubscribed,
                opened_at + delay("unsub_at") / 10,
            ));
        }
    }
    if draw("complain") < cfg.complaint_rate {
        out.push((OutcomeKind::complained, now + delay("complain_at")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_match_configuration() {
        let cfg = SimulatorConfig::default();
        let n = 20_000;
        let mut delivered = 0;
        let mut opened = 0;
        let mut clicked = 0;
        for i in 0..n {
            let plan = plan(&cfg, &format!("send-{i}"), 1_000);
            let has = |k| plan.iter().any(|(kind, _)| *kind == k);
            delivered += has(OutcomeKind::delivered) as u32;
            opened += has(OutcomeKind::opened) as u32;
            clicked += has(OutcomeKind::clicked) as u32;
            for (_, at) in &plan {
                assert!(*at >= 1_000, "outcomes never precede the send");
            }
        }
        let rate = |x: u32, of: u32| x as f64 / of as f64;
        assert!((0.97..0.99).contains(&rate(delivered, n)), "{delivered}");
        assert!((0.18..0.22).contains(&rate(opened, delivered)), "{opened}");
        assert!((0.12..0.18).contains(&rate(clicked, opened)), "{clicked}");
    }

    #[test]
    fn plans_are_deterministic() {
        let cfg = SimulatorConfig::default();
        assert_eq!(plan(&cfg, "x", 5), plan(&cfg, "x", 5));
    }
}
