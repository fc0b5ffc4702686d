//! jobmeter-kafka
