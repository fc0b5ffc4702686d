//! Parsers of command-line values that several subcommands share.

/// Parses a duration such as "250ms", "30s", "10m", "1h" or "7d" into
/// milliseconds (the same forms as the configuration's).
pub fn parse_duration(s: &str) -> Result<i64, String> {
    s.parse::<crate::dur::Dur>().map(crate::dur::Dur::ms)
}
