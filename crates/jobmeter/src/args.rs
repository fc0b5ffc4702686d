//! Parsers of command-line values that several subcommands share.

/// Parses a duration such as "250ms", "30s", "10m", "1h" or "7d" into
/// milliseconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    jobmeter_core::time::parse_duration_ms(s)
        .ok_or_else(|| format!("{s:?} is not a duration (examples: 250ms, 30s, 10m, 1h, 7d)"))
}
