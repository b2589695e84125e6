//! What each mode does when its driver comes round: the state machines of saga, TCC, XA and
//! 2-phase message, after DTM's. Every call is preceded by a durable write marking the branch
//! attempted, and every result is written before the next step acts on it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::branch::{self, Called, Outcome};
use crate::{op, status, Coordinator, Record, TxnError, MAX_INTERVAL, MSG, SAGA, TCC, XA};

/// Rejects saga orders with a cycle (a step that would wait for itself).
pub(crate) fn check_acyclic(orders: &BTreeMap<usize, Vec<usize>>, n: usize) -> Result<(), ()> {
    // Kahn's algorithm over "p before k" edges.
    let mut indegree = vec![0usize; n];
    for (k, pres) in orders {
        if let Some(d) = indegree.get_mut(*k) {
            *d += pres.len();
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|i| indegree.get(*i) == Some(&0)).collect();
    let mut seen = 0;
    while let Some(p) = ready.pop() {
        seen += 1;
        for (k, pres) in orders {
            for _ in pres.iter().filter(|x| **x == p) {
                if let Some(d) = indegree.get_mut(*k) {
                    *d -= 1;
                    if *d == 0 {
                        ready.push(*k);
                    }
                }
            }
        }
    }
    if seen == n {
        Ok(())
    } else {
        Err(())
    }
}

/// A saga's `custom_data`: step dependencies, and whether steps run concurrently.
fn saga_options(custom: &str) -> (BTreeMap<usize, Vec<usize>>, bool) {
    #[derive(serde::Deserialize, Default)]
    struct Custom {
        #[serde(default)]
        orders: Option<BTreeMap<String, Vec<usize>>>,
        #[serde(default)]
        concurrent: Option<bool>,
    }
    let c: Custom = serde_json::from_str(custom).unwrap_or_default();
    let orders = c.orders.unwrap_or_default().into_iter().filter_map(|(k, v)| Some((k.parse().ok()?, v))).collect();
    (orders, c.concurrent.unwrap_or(false))
}

impl Coordinator {
    /// One round of work on an unfinished transaction.
    pub(crate) async fn process(&self, rec: &mut Record) -> Result<(), TxnError> {
        match rec.trans.trans_type.as_str() {
            SAGA => self.saga(rec).await,
            TCC => self.two_phase(rec, op::CONFIRM, op::CANCEL, true).await,
            XA => self.two_phase(rec, op::COMMIT, op::ROLLBACK, false).await,
            MSG => self.message(rec).await,
            _ => Ok(()),
        }
    }

    async fn saga(&self, rec: &mut Record) -> Result<(), TxnError> {
        let (orders, concurrent_custom) = saga_options(&rec.trans.custom_data);
        let concurrent = concurrent_custom || rec.trans.options.concurrent;
        let n = rec.trans.steps.len();
        let action = |rec: &Record, i: usize| rec.branches.get(2 * i + 1).map(|b| (b.status.clone(), b.attempts)).unwrap_or_default();
        let compensated = |rec: &Record, i: usize| rec.branches.get(2 * i).is_some_and(|b| b.status == status::SUCCEED);
        if rec.trans.status == status::SUBMITTED && self.timed_out(rec) {
            let reason = format!("Timeout after {} seconds", rec.trans.options.timeout_to_fail);
            self.set_status(rec, status::ABORTING, &reason);
            self.save(rec).await?;
        }
        if rec.trans.status == status::SUBMITTED {
            loop {
                let runnable: Vec<usize> = (0..n)
                    .filter(|&i| action(rec, i).0 == status::PREPARED)
                    .filter(|&i| concurrent || i == 0 || action(rec, i - 1).0 == status::SUCCEED)
                    .filter(|&i| orders.get(&i).is_none_or(|pres| pres.iter().all(|p| action(rec, *p).0 == status::SUCCEED)))
                    .collect();
                if runnable.is_empty() {
                    break;
                }
                let results = self.run(rec, &runnable.iter().map(|i| 2 * i + 1).collect::<Vec<_>>()).await?;
                let mut stop = false;
                for (idx, called) in results {
                    match self.settle(rec, idx, &called, true) {
                        Outcome::Succeed => self.reset(rec),
                        Outcome::Failure(why) => {
                            self.set_status(rec, status::ABORTING, &why);
                            stop = true;
                        }
                        Outcome::Ongoing => {
                            self.keep(rec);
                            stop = true;
                        }
                        Outcome::Temporary(_) => {
                            let o = &mut rec.trans.options;
                            if o.retry_limit > 0 {
                                o.retry_count += 1;
                                if o.retry_count > o.retry_limit {
                                    let reason = format!("RetryCount is greater than RetryLimit, RetryLimit: {}", o.retry_limit);
                                    self.set_status(rec, status::ABORTING, &reason);
                                }
                            }
                            self.backoff(rec);
                            stop = true;
                        }
                    }
                }
                if rec.trans.status == status::ABORTING {
                    // Compensations start at once, not after the backoff.
                    rec.next_at_ms = 0;
                }
                if stop || rec.trans.status != status::SUBMITTED {
                    self.save(rec).await?;
                    break;
                }
                // Successes are written with the next step's attempt (or the final status), in
                // one write, before anything acts on them.
            }
            if rec.trans.status == status::SUBMITTED {
                if (0..n).all(|i| action(rec, i).0 == status::SUCCEED) {
                    self.set_status(rec, status::SUCCEED, "");
                }
                self.save(rec).await?;
                return Ok(());
            }
        }
        if rec.trans.status != status::ABORTING {
            return Ok(());
        }
        // Compensate, in reverse, every step whose action was attempted: a step only after every
        // step that ran after it (in order, or by `orders`) is compensated or was never tried.
        let attempted = |rec: &Record, i: usize| action(rec, i).1 > 0;
        let after = |j: usize, i: usize| if concurrent { orders.get(&j).is_some_and(|pres| pres.contains(&i)) } else { j > i };
        loop {
            let due: Vec<usize> = (0..n)
                .rev()
                .filter(|&i| attempted(rec, i) && !compensated(rec, i))
                .filter(|&i| (0..n).filter(|&j| after(j, i)).all(|j| !attempted(rec, j) || compensated(rec, j)))
                .collect();
            if due.is_empty() {
                break;
            }
            // A compensation must succeed: anything else is retried.
            if !self.run_to_success(rec, &due.iter().map(|i| 2 * i).collect::<Vec<_>>()).await? {
                return Ok(());
            }
        }
        if (0..n).all(|i| !attempted(rec, i) || compensated(rec, i)) {
            self.set_status(rec, status::FAILED, "");
            self.save(rec).await?;
        }
        Ok(())
    }

    /// TCC (confirm/cancel, last registered first) and XA (commit/rollback, in order).
    async fn two_phase(&self, rec: &mut Record, commit: &str, undo: &str, reverse: bool) -> Result<(), TxnError> {
        if rec.trans.status == status::PREPARED {
            if !self.timed_out(rec) {
                rec.next_at_ms = rec.created_ms + self.timeout_ms(rec);
                return Ok(());
            }
            let reason = format!("Timeout after {} seconds", self.timeout_ms(rec) / 1000);
            self.set_status(rec, status::ABORTING, &reason);
            self.save(rec).await?;
        }
        let (op, done) = match rec.trans.status.as_str() {
            status::SUBMITTED => (commit, status::SUCCEED),
            status::ABORTING => (undo, status::FAILED),
            _ => return Ok(()),
        };
        let mut pending: Vec<usize> =
            (0..rec.branches.len()).filter(|&i| rec.branches.get(i).is_some_and(|b| b.op == op && b.status != status::SUCCEED)).collect();
        if reverse {
            pending.reverse();
        }
        for idx in pending {
            if !self.run_to_success(rec, &[idx]).await? {
                return Ok(());
            }
        }
        self.set_status(rec, done, "");
        self.save(rec).await?;
        Ok(())
    }

    /// A 2-phase message: left prepared past its timeout, the application is asked through
    /// `query_prepared` whether it committed; once submitted, every step is delivered.
    async fn message(&self, rec: &mut Record) -> Result<(), TxnError> {
        if rec.trans.status == status::PREPARED {
            if !self.timed_out(rec) {
                rec.next_at_ms = rec.created_ms + self.timeout_ms(rec);
                return Ok(());
            }
            let url = rec.trans.query_prepared.clone();
            let called = self.call(rec, &url, "00", op::MSG, "", None).await;
            match called.outcome {
                Outcome::Succeed => {
                    if rec.branches.is_empty() {
                        self.set_status(rec, status::FAILED, "prepared message has no steps");
                    } else {
                        self.set_status(rec, status::SUBMITTED, "");
                    }
                    self.reset(rec);
                }
                Outcome::Failure(why) => self.set_status(rec, status::FAILED, &why),
                Outcome::Ongoing => self.keep(rec),
                Outcome::Temporary(why) => {
                    tracing::debug!(gid = %rec.trans.gid, %why, "query_prepared failed");
                    self.backoff(rec);
                }
            }
            self.save(rec).await?;
            if rec.trans.status != status::SUBMITTED {
                return Ok(());
            }
        }
        if rec.trans.status != status::SUBMITTED {
            return Ok(());
        }
        let pending: Vec<usize> = (0..rec.branches.len()).filter(|&i| rec.branches.get(i).is_some_and(|b| b.status != status::SUCCEED)).collect();
        let batches: Vec<Vec<usize>> = if rec.trans.options.concurrent { vec![pending] } else { pending.into_iter().map(|i| vec![i]).collect() };
        for batch in batches {
            if !self.run_to_success(rec, &batch).await? {
                return Ok(());
            }
        }
        self.set_status(rec, status::SUCCEED, "");
        self.save(rec).await?;
        Ok(())
    }

    fn timeout_ms(&self, rec: &Record) -> u64 {
        match rec.trans.options.timeout_to_fail {
            n if n > 0 => n as u64 * 1000,
            _ => self.defaults().timeout_to_fail.as_millis() as u64,
        }
    }

    /// Marks the branches attempted (durably), then calls them all at once.
    async fn run(&self, rec: &mut Record, idxs: &[usize]) -> Result<Vec<(usize, Called)>, TxnError> {
        for &i in idxs {
            if let Some(b) = rec.branches.get_mut(i) {
                b.attempts += 1;
            }
        }
        self.save(rec).await?;
        let rec: &Record = rec;
        let calls = idxs.iter().filter_map(|&i| Some((i, rec.branches.get(i)?))).map(|(i, b)| async move {
            let avoid = rec.avoid.get(&i).map(String::as_str);
            (i, self.call(rec, &b.url, &b.branch_id, &b.op, &b.data, avoid).await)
        });
        Ok(futures_util::future::join_all(calls).await)
    }

    /// Runs branches that must end in success (compensations, confirms, cancels, commits,
    /// rollbacks, message steps): true when all did; otherwise the retry is scheduled (425 keeps
    /// the interval, anything else backs off), written, and false. Successes are written with
    /// the next attempt or the final status.
    async fn run_to_success(&self, rec: &mut Record, idxs: &[usize]) -> Result<bool, TxnError> {
        let mut done = true;
        for (idx, called) in self.run(rec, idxs).await? {
            match self.settle(rec, idx, &called, false) {
                Outcome::Succeed => self.reset(rec),
                Outcome::Ongoing => {
                    self.keep(rec);
                    done = false;
                }
                Outcome::Failure(_) | Outcome::Temporary(_) => {
                    self.backoff(rec);
                    done = false;
                }
            }
        }
        if !done {
            self.save(rec).await?;
        }
        Ok(done)
    }

    async fn call(&self, rec: &Record, url: &str, branch_id: &str, op: &str, payload: &str, avoid: Option<&str>) -> Called {
        let c = branch::Call {
            url,
            gid: &rec.trans.gid,
            trans_type: &rec.trans.trans_type,
            branch_id,
            op,
            payload,
            headers: &rec.trans.options.branch_headers,
            timeout: self.request_timeout(rec),
            avoid,
        };
        let called = branch::call(&c, self.resolver(), &self.pool).await;
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.branch_calls.fetch_add(1, Relaxed);
        self.stats.branch_latency.observe(called.latency.as_secs_f64());
        called
    }

    /// Records a branch's result; a saga action's failure is final, anything else not yet.
    fn settle(&self, rec: &mut Record, idx: usize, called: &Called, failure_is_final: bool) -> Outcome {
        let outcome = match (&called.outcome, failure_is_final) {
            (Outcome::Failure(why), false) => Outcome::Temporary(why.clone()),
            (o, _) => o.clone(),
        };
        let now = crate::now_text();
        let Some(b) = rec.branches.get_mut(idx) else { return outcome };
        b.update_time = now.clone();
        let error = match &outcome {
            Outcome::Succeed => {
                b.status = status::SUCCEED.into();
                b.finish_time = Some(now);
                b.error = None;
                None
            }
            Outcome::Failure(why) => {
                b.status = status::FAILED.into();
                b.finish_time = Some(now);
                b.error = Some(why.clone());
                Some(why.clone())
            }
            Outcome::Ongoing => Some("ONGOING".to_string()),
            Outcome::Temporary(why) => {
                b.error = Some(why.clone());
                Some(why.clone())
            }
        };
        match (&outcome, &called.instance) {
            (Outcome::Temporary(_), Some(instance)) => {
                rec.avoid.insert(idx, instance.clone());
            }
            _ => {
                rec.avoid.remove(&idx);
            }
        }
        if let Some(b) = rec.branches.get(idx) {
            self.event(rec, Some((b, called.latency.as_millis() as u64, error.as_deref())));
        }
        outcome
    }

    /// After a success: the wait between attempts starts over.
    fn reset(&self, rec: &mut Record) {
        rec.interval_ms = self.retry_interval(rec).as_millis() as u64;
        rec.failures = 0;
        rec.next_at_ms = 0;
    }

    /// Not done yet (425): asked again after the retry interval, without backing off.
    fn keep(&self, rec: &mut Record) {
        let wait = self.retry_interval(rec).as_millis() as u64;
        self.schedule(rec, wait);
    }

    /// A temporary failure: the next attempt after the current interval, which doubles; an
    /// alert event once the failures pass the limit.
    fn backoff(&self, rec: &mut Record) {
        rec.failures += 1;
        self.stats.branch_retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wait = rec.interval_ms.max(1);
        self.schedule(rec, wait);
        rec.interval_ms = (rec.interval_ms.max(1) * 2).min(MAX_INTERVAL.as_millis() as u64);
        if rec.failures == self.defaults().alert_after_retries {
            tracing::warn!(gid = %rec.trans.gid, failures = rec.failures, "transaction keeps failing");
            let mut alert = rec.clone();
            alert.trans.status = "alert".into();
            self.event(&alert, None);
            if let Some(url) = self.defaults().alert_webhook.clone() {
                // DTM's alert shape; sent on its own task, bounded, best effort.
                let failing = rec.branches.iter().rev().find(|b| b.error.is_some());
                let body = serde_json::json!({
                    "gid": rec.trans.gid, "status": rec.trans.status, "trans_type": rec.trans.trans_type,
                    "branch": failing.map(|b| b.url.as_str()), "error": failing.and_then(|b| b.error.as_deref()), "retry_count": rec.failures,
                });
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                tokio::spawn(async move {
                    let send = zhili_net::client::request(http::Method::POST, &url, headers, body.to_string().into(), 4096);
                    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(Duration::from_secs(10), send).await.map_err(|_| "timed out".to_string()) {
                        tracing::warn!(error = %e, "transaction alert webhook failed");
                    }
                });
            }
        }
    }

    fn schedule(&self, rec: &mut Record, wait_ms: u64) {
        rec.next_at_ms = crate::unix_ms() + wait_ms;
        rec.trans.next_cron_interval = Duration::from_millis(wait_ms).as_secs() as i64;
        rec.trans.next_cron_time = Some(zhili_model::event::timestamp(rec.next_at_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saga_orders_must_not_cycle() {
        let orders = |pairs: &[(usize, &[usize])]| pairs.iter().map(|(k, v)| (*k, v.to_vec())).collect::<BTreeMap<_, _>>();
        assert!(check_acyclic(&orders(&[(2, &[0, 1]), (3, &[2])]), 4).is_ok());
        assert!(check_acyclic(&orders(&[]), 3).is_ok());
        assert!(check_acyclic(&orders(&[(0, &[1]), (1, &[0])]), 2).is_err());
        assert!(check_acyclic(&orders(&[(0, &[2]), (1, &[0]), (2, &[1])]), 3).is_err());
        let (o, concurrent) = saga_options(r#"{"orders": {"2": [0, 1]}, "concurrent": true}"#);
        assert_eq!((o.get(&2).cloned(), concurrent), (Some(vec![0, 1]), true));
        assert_eq!(saga_options("").0.len(), 0);
    }
}
