//! Producing under backpressure.
//!
//! librdkafka refuses a record with `QueueFull` while its local queue
//! (`queue.buffering.max.messages` / `.kbytes`) is full; the record comes
//! back and may be sent again once delivery reports free room. Every
//! producer in jobmeter sends through [`send_waiting`].

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, Partitioner, ProducerContext, ThreadedProducer};
use std::time::{Duration, Instant};

/// How long to wait before offering a refused record again.
const BACKOFF: Duration = Duration::from_millis(2);

/// Sends `record` with `producer`, waiting while its local queue is full:
/// forever with `timeout` `None`, else until it has passed (then the
/// `QueueFull` error is returned). Any other error is returned at once.
pub fn send_waiting<'a, K, P, C, Part>(
    producer: &ThreadedProducer<C, Part>,
    record: BaseRecord<'a, K, P, C::DeliveryOpaque>,
    timeout: Option<Duration>,
) -> Result<(), KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    Part: Partitioner,
    C: ProducerContext<Part> + 'static,
{
    // rdkafka hands a refused record back inside its error: that is the
    // large `Err` of this closure.
    #[allow(clippy::result_large_err)]
    offer_until_accepted(record, timeout, |r| producer.send(r))
}

/// Offers `record` to `send` until it is accepted or an error other than a
/// full queue (or the timeout) ends it.
fn offer_until_accepted<R>(
    mut record: R,
    timeout: Option<Duration>,
    mut send: impl FnMut(R) -> Result<(), (KafkaError, R)>,
) -> Result<(), KafkaError> {
    let started = Instant::now();
    loop {
        match send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                if timeout.is_none_or(|t| started.elapsed() < t) =>
            {
                record = r;
                std::thread::sleep(BACKOFF);
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full<R>(r: R) -> Result<(), (KafkaError, R)> {
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
    }

    #[test]
    fn retries_while_the_queue_is_full_then_sends() {
        let mut offers = 0;
        let res = offer_until_accepted(7u32, None, |r| {
            offers += 1;
            if offers < 4 {
                full(r)
            } else {
                assert_eq!(r, 7, "the same record is offered again");
                Ok(())
            }
        });
        assert!(res.is_ok());
        assert_eq!(offers, 4);
    }

    #[test]
    fn gives_up_after_the_timeout() {
        let res = offer_until_accepted((), Some(Duration::from_millis(20)), full);
        assert!(matches!(
            res,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
        ));
    }

    #[test]
    fn other_errors_are_returned_at_once() {
        let mut offers = 0;
        let res = offer_until_accepted((), None, |r| {
            offers += 1;
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), r))
        });
        assert!(matches!(
            res,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge))
        ));
        assert_eq!(offers, 1);
    }
}
