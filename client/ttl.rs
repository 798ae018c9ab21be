//! Time-to-live constants with the seed's names and values (`CACHE_MINUTE` … `CACHE_MONTH`).

use std::time::Duration;

/// The seed's TTL constants as [`Duration`]s: `CACHE_HOUR` is `Ttl::HOUR`, `CACHE_15_MINUTES`
/// is `Ttl::MINUTES_15`, and so on. A month is 30 days, the server's default maximum.
#[derive(Debug, Clone, Copy)]
pub struct Ttl;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

impl Ttl {
    /// One minute (`CACHE_MINUTE`).
    pub const MINUTE: Duration = Duration::from_secs(MINUTE);
    /// 15 minutes (`CACHE_15_MINUTES`).
    pub const MINUTES_15: Duration = Duration::from_secs(15 * MINUTE);
    /// 30 minutes (`CACHE_30_MINUTES`).
    pub const MINUTES_30: Duration = Duration::from_secs(30 * MINUTE);
    /// One hour (`CACHE_HOUR`).
    pub const HOUR: Duration = Duration::from_secs(HOUR);
    /// 8 hours (`CACHE_8_HOURS`).
    pub const HOURS_8: Duration = Duration::from_secs(8 * HOUR);
    /// 12 hours (`CACHE_12_HOURS`).
    pub const HOURS_12: Duration = Duration::from_secs(12 * HOUR);
    /// One day (`CACHE_DAY`).
    pub const DAY: Duration = Duration::from_secs(DAY);
    /// 2 days (`CACHE_2_DAYS`).
    pub const DAYS_2: Duration = Duration::from_secs(2 * DAY);
    /// One week (`CACHE_WEEK`).
    pub const WEEK: Duration = Duration::from_secs(7 * DAY);
    /// 2 weeks (`CACHE_2_WEEKS`).
    pub const WEEKS_2: Duration = Duration::from_secs(14 * DAY);
    /// 30 days (`CACHE_MONTH`).
    pub const MONTH: Duration = Duration::from_secs(30 * DAY);
}

/// The longest TTL the server accepts unless started with another `--max-ttl-seconds`: 30
/// days, [`Ttl::MONTH`]. The server's default maximum and the client's default
/// [`ClientOptions::max_ttl`](crate::ClientOptions::max_ttl), so both sides agree by
/// construction.
pub const DEFAULT_MAX_TTL_SECONDS: u32 = 30 * DAY as u32;

#[cfg(test)]
mod tests {
    use super::*;

    /// The values are the seed's, in seconds; the default maximum is a month.
    #[test]
    fn seed_values() {
        let seconds = [
            (Ttl::MINUTE, 60),
            (Ttl::MINUTES_15, 900),
            (Ttl::MINUTES_30, 1800),
            (Ttl::HOUR, 3600),
            (Ttl::HOURS_8, 28_800),
            (Ttl::HOURS_12, 43_200),
            (Ttl::DAY, 86_400),
            (Ttl::DAYS_2, 172_800),
            (Ttl::WEEK, 604_800),
            (Ttl::WEEKS_2, 1_209_600),
            (Ttl::MONTH, 2_592_000),
        ];
        for (ttl, expected) in seconds {
            assert_eq!(ttl.as_secs(), expected);
        }
        assert_eq!(u64::from(DEFAULT_MAX_TTL_SECONDS), Ttl::MONTH.as_secs());
    }
}
