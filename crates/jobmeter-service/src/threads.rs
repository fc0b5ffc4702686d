//! Named OS threads whose ends are awaited, not polled. The meter's
//! pipelines and account tailers block (librdkafka's transactional calls,
//! RocksDB writes), so they run on threads of their own, named for `top`
//! and for the logs; each reports its end — its result, or that it
//! panicked — through a oneshot channel collected in a
//! [`tokio::task::JoinSet`].

use crate::ServiceError;
use tokio::task::JoinSet;

/// A set of named threads (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct Threads(JoinSet<(String, Result<(), ServiceError>)>);

impl Threads {
    /// Starts `body` on a new thread called `name`. Must be called within a
    /// tokio runtime.
    pub(crate) fn spawn<F>(&mut self, name: &str, body: F) -> Result<(), ServiceError>
    where
        F: FnOnce() -> Result<(), ServiceError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // `body` and what it holds are dropped before the end is
                // reported: whoever awaits it may close what it shared.
                let _ = tx.send(body());
            })
            .map_err(|source| ServiceError::Thread {
                name: name.to_owned(),
                source,
            })?;
        let name = name.to_owned();
        self.0.spawn(async move {
            // The sender is dropped without a send only when `body` panicked.
            let result = rx.await.unwrap_or_else(|_| Err(ServiceError::Panicked(name.clone())));
            (name, result)
        });
        Ok(())
    }

    /// The next thread to end: its name and result; `None` when none is left.
    pub(crate) async fn next(&mut self) -> Option<(String, Result<(), ServiceError>)> {
        let joined = self.0.join_next().await?;
        Some(joined.unwrap_or_else(|e| ("supervisor".into(), Err(ServiceError::Panicked(e.to_string())))))
    }

    /// Waits for every thread to end; the first failure, if any.
    pub(crate) async fn join_all(&mut self) -> Result<(), ServiceError> {
        let mut first = Ok(());
        while let Some((_, r)) = self.next().await {
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// How many threads have not ended yet.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_thread_reports_its_result_and_a_panic_is_named() {
        let mut t = Threads::default();
        t.spawn("ok", || Ok(())).unwrap();
        t.spawn("boom", || panic!("on purpose")).unwrap();
        t.spawn("fails", || Err(ServiceError::Tokens("no".into()))).unwrap();
        assert_eq!(t.len(), 3);
        let mut seen = Vec::new();
        while let Some((name, r)) = t.next().await {
            seen.push((name, r.map_err(|e| e.to_string())));
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(seen[0].0, "boom");
        assert!(seen[0].1.as_ref().unwrap_err().contains("boom"), "{seen:?}");
        assert!(seen[1].1.as_ref().unwrap_err().contains("no"), "{seen:?}");
        assert_eq!(seen[2], ("ok".into(), Ok(())));
        assert!(t.join_all().await.is_ok(), "nothing left to join");
    }

    #[tokio::test]
    async fn join_all_keeps_the_first_failure() {
        let mut t = Threads::default();
        t.spawn("a", || Err(ServiceError::Tokens("first".into()))).unwrap();
        let r = t.join_all().await;
        assert!(r.unwrap_err().to_string().contains("first"));
        assert_eq!(t.len(), 0);
    }
}
