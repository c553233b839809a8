//! `--cron-restart`: when the next scheduled rolling reload is due. Pure:
//! the supervisor passes the wall clock in on its one-second tick, so a
//! clock set forward or back (NTP, a suspended VM) moves the reload with
//! it, and a tick late by any amount still fires once, not once per time
//! missed.

use chrono::{DateTime, TimeZone};

use crate::config::CronSpec;

pub struct Schedule<Tz: TimeZone> {
    spec: CronSpec,
    next: Option<DateTime<Tz>>,
}

impl<Tz: TimeZone> Schedule<Tz> {
    pub fn new(spec: CronSpec, now: &DateTime<Tz>) -> Self {
        let next = spec.0.find_next_occurrence(now, false).ok();
        Schedule { spec, next }
    }

    /// The next time a reload is due (`None`: the pattern has no more).
    pub fn next(&self) -> Option<&DateTime<Tz>> {
        self.next.as_ref()
    }

    /// Whether a reload is due at `now`; if so, moves on to the first time
    /// after `now`.
    pub fn due(&mut self, now: &DateTime<Tz>) -> bool {
        match &self.next {
            Some(next) if now >= next => {
                self.next = self.spec.0.find_next_occurrence(now, false).ok();
                true
            }
            _ => false,
        }
    }

    /// The next time, for the log: `2026-12-05 03:00:00 +01:00`, or `never`.
    pub fn next_text(&self) -> String
    where
        Tz::Offset: std::fmt::Display,
    {
        self.next().map_or("never".into(), |n| {
            n.format("%Y-%m-%d %H:%M:%S %:z").to_string()
        })
    }

    pub fn pattern(&self) -> String {
        self.spec.0.pattern.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 4, h, m, s).unwrap()
    }

    #[test]
    fn fires_once_at_each_time_and_once_for_times_missed() {
        let spec: CronSpec = "0 3 * * *".parse().unwrap();
        let mut s = Schedule::new(spec, &at(1, 0, 0));
        assert_eq!(s.next(), Some(&at(3, 0, 0)));
        assert!(!s.due(&at(2, 59, 59)));
        assert!(s.due(&at(3, 0, 0)));
        assert!(!s.due(&at(3, 0, 1)), "once a day");
        assert_eq!(s.next(), Some(&(at(3, 0, 0) + chrono::Duration::days(1))));
        // Every minute, the tick late by 10 minutes: one reload, then the
        // next minute after that tick.
        let mut s = Schedule::new("* * * * *".parse().unwrap(), &at(1, 0, 30));
        assert!(s.due(&at(1, 11, 0)));
        assert_eq!(s.next(), Some(&at(1, 12, 0)));
        assert!(!s.due(&at(1, 11, 59)));
    }

    #[test]
    fn six_fields_start_with_seconds_and_a_bad_pattern_says_how_to_write_one() {
        let mut s = Schedule::new("*/10 * * * * *".parse().unwrap(), &at(1, 0, 1));
        assert_eq!(s.next(), Some(&at(1, 0, 10)));
        assert!(s.due(&at(1, 0, 10)));
        assert_eq!(s.next(), Some(&at(1, 0, 20)));
        let e = "every day".parse::<CronSpec>().unwrap_err();
        assert!(
            e.contains("is not a cron pattern") && e.contains("0 3 * * *"),
            "{e}"
        );
    }
}
