//! jobmeter-store
