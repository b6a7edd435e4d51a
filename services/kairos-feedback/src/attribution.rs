//! Last-touch attribution of purchases to the final decisions of marketing triggers.
//!
//! Every customer has at most one live touch: the newest final decision of a marketing
//! trigger, in the experiment group the arbiter drew the customer into (intent to
//! treat: a treated customer whose message a sunset, an unsubscribe or a cap stopped
//! counts in the treatment group as a held-out one counts in the control group). A
//! purchase within the window after it is that
//! touch's conversion; further purchases in the window add revenue but not another
//! conversion, so conversion rates stay between 0 and 1 and compare fairly between the
//! groups.

use kairos_core::contracts::{Channel, ExperimentGroup};
use kairos_core::time::Millis;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Group {
    /// A message was sent.
    Treatment,
    /// The customer was held out (global control group or scenario holdout).
    Control,
}

impl Group {
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Treatment => "treatment",
            Group::Control => "control",
        }
    }

    pub fn index(self) -> usize {
        match self {
            Group::Treatment => 0,
            Group::Control => 1,
        }
    }
}

impl From<ExperimentGroup> for Group {
    fn from(g: ExperimentGroup) -> Self {
        match g {
            ExperimentGroup::treatment => Group::Treatment,
            ExperimentGroup::control => Group::Control,
        }
    }
}

/// The customer's last touch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Touch {
    pub scenario: String,
    /// The channel sent on; none when nothing was sent.
    pub channel: Option<Channel>,
    pub at: Millis,
    /// Whether a purchase already converted this touch.
    pub converted: bool,
    /// The customer's experiment group; absent in touches stored before groups were
    /// (the channel tells then: a message went out to the treated only).
    #[serde(default)]
    pub group: Option<Group>,
}

/// What a purchase means for a touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribution {
    /// The purchase falls in the touch's window: its revenue counts for the touch.
    pub attributed: bool,
    /// It is the touch's first such purchase: one conversion.
    pub first_conversion: bool,
}

impl Touch {
    pub fn group(&self) -> Group {
        match (self.group, self.channel) {
            (Some(g), _) => g,
            (None, Some(_)) => Group::Treatment,
            (None, None) => Group::Control,
        }
    }

    /// Labels scenario, channel ("none" for control) and group.
    pub fn labels(&self) -> [&str; 3] {
        [
            &self.scenario,
            self.channel.map_or("none", |c| c.as_str()),
            self.group().as_str(),
        ]
    }

    /// Whether a purchase at `purchased_at` belongs to this touch.
    pub fn attribute(&self, purchased_at: Millis, window: Millis) -> Attribution {
        // Strictly after: a purchase at the touch's own time is the one that caused it
        // (a segment entered by buying), not its conversion.
        let attributed = purchased_at > self.at && purchased_at - self.at <= window;
        Attribution {
            attributed,
            first_conversion: attributed && !self.converted,
        }
    }
}

/// `numerator / denominator`, none while the denominator is zero.
pub fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// Relative lift of the treatment over the control conversion rate; none while either
/// rate is unknown or the control rate is zero (the lift is then unbounded).
pub fn lift(treatment_rate: Option<f64>, control_rate: Option<f64>) -> Option<f64> {
    match (treatment_rate, control_rate) {
        (Some(t), Some(c)) if c > 0.0 => Some(t / c - 1.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Millis = 3_600_000;

    fn touch(channel: Option<Channel>, converted: bool) -> Touch {
        Touch {
            scenario: "welcome".into(),
            channel,
            at: 100 * HOUR,
            converted,
            group: None,
        }
    }

    #[test]
    fn purchase_inside_the_window_converts_once() {
        let t = touch(Some(Channel::email), false);
        assert_eq!(
            t.attribute(100 * HOUR + 72 * HOUR, 72 * HOUR),
            Attribution {
                attributed: true,
                first_conversion: true
            }
        );
        let converted = touch(Some(Channel::email), true);
        assert_eq!(
            converted.attribute(101 * HOUR, 72 * HOUR),
            Attribution {
                attributed: true,
                first_conversion: false
            }
        );
    }

    #[test]
    fn purchase_outside_the_window_or_before_the_touch_is_not_attributed() {
        let t = touch(None, false);
        assert!(
            !t.attribute(100 * HOUR + 72 * HOUR + 1, 72 * HOUR)
                .attributed
        );
        assert!(!t.attribute(99 * HOUR, 72 * HOUR).attributed);
        assert!(!t.attribute(99 * HOUR, 72 * HOUR).first_conversion);
        // At the touch's own time: the purchase that caused it, not its conversion.
        assert!(!t.attribute(100 * HOUR, 72 * HOUR).attributed);
        assert!(t.attribute(100 * HOUR + 1, 72 * HOUR).attributed);
    }

    #[test]
    fn a_touch_s_group_is_the_one_stored_or_else_follows_the_channel() {
        assert_eq!(
            touch(Some(Channel::sms), false).labels(),
            ["welcome", "sms", "treatment"]
        );
        assert_eq!(touch(None, false).labels(), ["welcome", "none", "control"]);
        let unsent = Touch {
            group: Some(Group::Treatment),
            ..touch(None, false)
        };
        assert_eq!(unsent.labels(), ["welcome", "none", "treatment"]);
    }

    #[test]
    fn lift_compares_conversion_rates() {
        let treatment = ratio(3, 10);
        let control = ratio(1, 10);
        let lift = lift(treatment, control).unwrap();
        assert!((lift - 2.0).abs() < 1e-12, "lift {lift}");
        assert_eq!(super::lift(Some(0.3), Some(0.0)), None);
        assert_eq!(ratio(1, 0), None);
    }
}
