//! Attribution of purchases to the final decisions of marketing triggers.
//!
//! A touch is the final decision of a marketing trigger, in the experiment group the
//! arbiter drew the customer into (intent to treat: a treated customer whose message a
//! sunset, an unsubscribe or a cap stopped counts in the treatment group as a held-out
//! one counts in the control group). A purchase converts, once, every touch whose
//! window it falls in, for the scenario's conversion rate and lift (see
//! [`Touch::lift_conversion`]); its revenue belongs to the customer's last touch
//! strictly before it (see [`live_touch`]), if it falls within the window after it,
//! on the channel of the touch's last message that reached the customer (see
//! [`Touch::reached_channel`]). Further purchases in the window add revenue but not
//! another conversion, so conversion rates stay between 0 and 1 and compare fairly
//! between the groups.
//!
//! A customer's recent touches are kept, not only the last one read: decisions and
//! purchases come on different topics, each read at its own speed, so a decision the
//! purchase caused (a cancellation, a post-purchase message) is often read before the
//! purchase, and the touch before it must still be found.

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

/// A touch of the customer's (see the module's documentation).
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
    /// The decision sent a message or held one out; else (a sunset, a cancellation)
    /// it takes purchases only once no message is in its window (see
    /// [`live_touch`]). A touch stored before this was kept counts as a message: it
    /// was the customer's one touch.
    #[serde(default = "stored_before")]
    pub message: bool,
    /// The decision's id, which tells two touches apart that agree in everything
    /// else (a merge brings the merged customer's touches to the survivor's); absent
    /// in touches stored before it was kept.
    #[serde(default)]
    pub decision_id: Option<String>,
    /// Written by earlier versions (the process that counted the touch in its
    /// conversion-rate tally, a number drawn at its start); no longer written or read:
    /// state must not depend on which process wrote it (see
    /// `FeedbackProcessor::tally_since`). Kept so that stored touches still decode.
    #[serde(default)]
    pub counted_by: Option<u64>,
    /// Whether a purchase within the window after it was counted for the scenario's
    /// conversion rate and lift (see [`Touch::lift_conversion`]), last touch or not.
    #[serde(default)]
    pub lift_converted: bool,
    /// The trigger the touch decided, which a cascade's later steps name; absent in
    /// touches stored before it was kept.
    #[serde(default)]
    pub trigger_id: Option<String>,
    /// The messages the touch sent, oldest first: its first, then a cascade's later
    /// steps. Empty for a touch that sent nothing, and for one stored before they were
    /// kept (its `channel` stands then).
    #[serde(default)]
    pub steps: Vec<SentStep>,
}

/// A message a touch sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentStep {
    pub send_id: String,
    pub channel: Channel,
    pub at: Millis,
}

fn stored_before() -> bool {
    true
}

/// Touches kept per customer at most, the newest: more touches than this within an
/// attribution window before one purchase is a customer every scenario fires for.
pub const TOUCHES_KEPT: usize = 16;

/// A customer's touches as stored: oldest first, or the one last touch versions
/// before kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StoredTouches {
    Touches(Vec<Touch>),
    LastTouch(Touch),
}

impl StoredTouches {
    pub fn into_vec(self) -> Vec<Touch> {
        match self {
            StoredTouches::Touches(touches) => touches,
            StoredTouches::LastTouch(touch) => vec![touch],
        }
    }
}

/// Adds `touch` in time order (after touches at the same time: read later, it is the
/// later one) and keeps [`TOUCHES_KEPT`]: the oldest go, but never the touch a
/// purchase after all of them would take (a message followed by more unsent decisions
/// than are kept, all in its window, stays the customer's touch).
pub fn add_touch(touches: &mut Vec<Touch>, touch: Touch, window: Millis) {
    let at = touches.partition_point(|t| t.at <= touch.at);
    touches.insert(at, touch);
    while touches.len() > TOUCHES_KEPT {
        // The touch of a purchase right after the newest touch.
        let next = touches
            .last()
            .map_or(Millis::MAX, |t| t.at.saturating_add(1));
        let live = live_touch(touches, next, window);
        touches.remove(if live == Some(0) { 1 } else { 0 });
    }
}

/// The touch a purchase at `purchased_at` belongs to, if any: the last one strictly
/// before it, except that a touch that sent and held out nothing (a sunset, a pause
/// or an exclusion a purchase caused) leaves a message whose window the purchase is
/// still in its purchases; it would otherwise take the repeat purchases of the
/// message before it. After another unsent touch, or past the message's window, it
/// is the touch.
pub fn live_touch(touches: &[Touch], purchased_at: Millis, window: Millis) -> Option<usize> {
    let mut live: Option<usize> = None;
    for (i, touch) in touches.iter().enumerate() {
        if touch.at >= purchased_at {
            break;
        }
        // An unsent touch gives way to any later one: it holds no message's window.
        let replaces = live.is_none_or(|l| {
            touch.message
                || !touches[l].message
                || purchased_at.saturating_sub(touches[l].at) > window
        });
        if replaces {
            live = Some(i);
        }
    }
    live
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

    /// The channel of the last message the touch sent before `purchased_at` that
    /// reached the customer (`unreached` tells a send that failed or bounced hard):
    /// a cascade's SMS that followed the e-mail earns the purchase after it, and a
    /// touch whose every message failed earns as one that sent nothing. A touch
    /// stored before its messages were kept: the channel it sent on.
    pub fn reached_channel(
        &self,
        purchased_at: Millis,
        mut unreached: impl FnMut(&str) -> anyhow::Result<bool>,
    ) -> anyhow::Result<Option<Channel>> {
        if self.steps.is_empty() {
            return Ok(self.channel);
        }
        for step in self.steps.iter().rev() {
            if step.at < purchased_at && !unreached(&step.send_id)? {
                return Ok(Some(step.channel));
            }
        }
        Ok(None)
    }

    /// Whether `other` is this touch, converted or not (the same decision's touch
    /// arriving again, as after a merge re-sent).
    pub fn same_touch(&self, other: &Touch) -> bool {
        if let (Some(mine), Some(theirs)) = (&self.decision_id, &other.decision_id) {
            return mine == theirs;
        }
        let key = |t: &Touch| (t.scenario.clone(), t.channel, t.at, t.group, t.message);
        key(self) == key(other)
    }

    /// Whether a purchase at `purchased_at` converts this touch for its scenario's
    /// conversion rate and lift, for the first time: any purchase within the window
    /// after it, whatever touched the customer since. Last touch would take the
    /// conversion from a scenario whose message caused a later one (a cart e-mail's
    /// click, then a browse-abandonment message): the treated customers' later
    /// touches, which the held-out ones never get, would make the scenario look worse
    /// than holding out (as Braze counts a conversion for every campaign whose window
    /// it falls in). A touch converted last-touch was counted so then.
    pub fn lift_conversion(&self, purchased_at: Millis, window: Millis) -> bool {
        self.in_window(purchased_at, window) && !self.lift_converted && !self.converted
    }

    /// Whether a purchase at `purchased_at` falls in the window after the touch:
    /// strictly after it (a purchase at the touch's own time is the one that caused
    /// it, a segment entered by buying, not its conversion), at most `window` later.
    fn in_window(&self, purchased_at: Millis, window: Millis) -> bool {
        purchased_at > self.at && purchased_at - self.at <= window
    }

    /// Whether a purchase at `purchased_at` belongs to this touch.
    pub fn attribute(&self, purchased_at: Millis, window: Millis) -> Attribution {
        let attributed = self.in_window(purchased_at, window);
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
            message: true,
            decision_id: None,
            counted_by: None,
            lift_converted: false,
            trigger_id: None,
            steps: Vec::new(),
        }
    }

    /// Touches with decision ids are the same only with the same id; without, when
    /// they agree in everything but the conversion.
    #[test]
    fn touches_are_told_apart_by_their_decisions() {
        let with = |id: &str| Touch {
            decision_id: Some(id.into()),
            ..touch(Some(Channel::email), false)
        };
        assert!(with("d1").same_touch(&with("d1")));
        assert!(
            !with("d1").same_touch(&with("d2")),
            "two decisions at one time"
        );
        let email = |converted| touch(Some(Channel::email), converted);
        assert!(email(true).same_touch(&email(false)));
        assert!(!email(false).same_touch(&touch(None, false)));
    }

    /// The touch of a purchase is the last before it, whatever order they were read
    /// in; an unsent decision takes over only past the window of the message before.
    #[test]
    fn a_purchase_belongs_to_the_last_touch_before_it() {
        let at = |hours: Millis, message: bool| Touch {
            at: hours * HOUR,
            message,
            ..touch(Some(Channel::email), false)
        };
        let mut touches = Vec::new();
        let window = 24 * HOUR;
        for t in [at(10, true), at(2, true), at(5, false), at(30, false)] {
            add_touch(&mut touches, t, window);
        }
        let hours: Vec<Millis> = touches.iter().map(|t| t.at / HOUR).collect();
        assert_eq!(hours, [2, 5, 10, 30]);
        let live = |t: Millis| live_touch(&touches, t * HOUR, window).map(|i| touches[i].at / HOUR);
        assert_eq!(live(1), None, "before every touch");
        assert_eq!(live(2), None, "at a touch's own time: its cause");
        assert_eq!(
            live(6),
            Some(2),
            "the unsent decision at 5 leaves the message its purchase"
        );
        assert_eq!(live(11), Some(10));
        assert_eq!(
            live(31),
            Some(10),
            "the sunset at 30 is within the message's window"
        );
        assert_eq!(
            live(35),
            Some(30),
            "a purchase past the message's window belongs to the sunset after it"
        );
        let mut late = touches.clone();
        add_touch(&mut late, at(60, false), window);
        assert_eq!(
            live_touch(&late, 61 * HOUR, window).map(|i| late[i].at / HOUR),
            Some(60),
            "past the message's window the unsent decision is the touch"
        );
        // Unsent decisions one after another: the last before the purchase.
        let unsent = [at(40, false), at(41, false), at(50, false)];
        let live_of =
            |t: Millis| live_touch(&unsent, t * HOUR, window).map(|i| unsent[i].at / HOUR);
        assert_eq!(live_of(42), Some(41));
        assert_eq!(live_of(70), Some(50), "in the window of the last one");
        for n in 0..TOUCHES_KEPT as Millis {
            add_touch(&mut touches, at(100 + n, true), window);
        }
        assert_eq!(touches.len(), TOUCHES_KEPT);
        assert_eq!(touches[0].at, 100 * HOUR, "the oldest go first");
        // A message followed by more unsent decisions than are kept, all in its
        // window: it stays the touch of a purchase after them.
        let mut touches = vec![at(200, true)];
        for n in 0..TOUCHES_KEPT as Millis + 4 {
            add_touch(&mut touches, at(201 + n / 4, false), window);
        }
        assert_eq!(touches.len(), TOUCHES_KEPT);
        assert_eq!(
            live_touch(&touches, 210 * HOUR, window).map(|i| touches[i].at / HOUR),
            Some(200)
        );
    }

    /// A customer's last touch as versions before kept it still reads, as the one
    /// touch of the list.
    #[test]
    fn a_last_touch_stored_before_reads_as_the_customer_s_touches() {
        #[derive(Serialize)]
        struct Before {
            scenario: String,
            channel: Option<Channel>,
            at: Millis,
            converted: bool,
            group: Option<Group>,
        }
        let before = Before {
            scenario: "welcome".into(),
            channel: Some(Channel::email),
            at: 100 * HOUR,
            converted: true,
            group: Some(Group::Treatment),
        };
        let bytes = kairos_core::encoding::encode_state(&before).expect("encode");
        let stored: StoredTouches = kairos_core::encoding::decode_state(&bytes).expect("decode");
        let touches = stored.into_vec();
        assert_eq!(
            touches,
            [Touch {
                group: Some(Group::Treatment),
                ..touch(Some(Channel::email), true)
            }]
        );
        let now = kairos_core::encoding::encode_state(&touches).expect("encode");
        let again: StoredTouches = kairos_core::encoding::decode_state(&now).expect("decode");
        assert_eq!(again.into_vec(), touches);
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
