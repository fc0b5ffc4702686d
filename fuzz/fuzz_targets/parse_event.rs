//! Event and account-record parsing never panics, whatever the bytes, and
//! every accepted event survives a re-serialisation of its time.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = jobmeter_core::parse_job_event(data) {
        let again = jobmeter_core::Timestamp::parse(&ev.time.to_string());
        assert_eq!(again.ok(), Some(ev.time));
    }
    let _ = jobmeter_core::AccountRecord::parse(data);
});
