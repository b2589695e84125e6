//! DTM's sub-transaction barrier: a branch handler runs its business work in the same local
//! database transaction as an insert into a `barrier` table keyed by (gid, branch_id, op,
//! barrier_id). That one insert makes the branch
//! - **idempotent**: a repeated call finds its row and does nothing;
//! - **null-compensation safe**: a compensate (or cancel) whose action (or try) never ran
//!   inserts the action's row first, finds it new, and does nothing;
//! - **hanging safe**: an action that arrives after its compensation finds the row the
//!   compensation put there for it, and does nothing.
//!
//! The database is the application's: implement [`BarrierStore`] on its transaction type (an
//! `INSERT ... ON CONFLICT DO NOTHING` and a select; [`BARRIER_TABLE_SQL`] creates the table),
//! then wrap each handler's work in [`BranchBarrier::call`] and commit when it returns `Ok`.

use std::collections::HashMap;

use crate::ClientError;

/// The barrier table for SQLite, PostgreSQL and MySQL 8 (the unique key does the work).
pub const BARRIER_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS barrier (
    trans_type VARCHAR(45) NOT NULL DEFAULT '',
    gid VARCHAR(128) NOT NULL DEFAULT '',
    branch_id VARCHAR(128) NOT NULL DEFAULT '',
    op VARCHAR(45) NOT NULL DEFAULT '',
    barrier_id VARCHAR(45) NOT NULL DEFAULT '',
    reason VARCHAR(45) NOT NULL DEFAULT '',
    UNIQUE (gid, branch_id, op, barrier_id))";

/// The message's local work is recorded under this branch and op (as DTM does).
const MSG_BRANCH: &str = "00";
const MSG_OP: &str = "msg";
const MSG_BARRIER: &str = "01";
const ROLLBACK: &str = "rollback";

/// One row of the barrier table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierRow<'a> {
    pub trans_type: &'a str,
    pub gid: &'a str,
    pub branch_id: &'a str,
    pub op: &'a str,
    pub barrier_id: &'a str,
    /// The op that inserted the row (it differs from `op` for a row put there on another's
    /// behalf, and is `rollback` for a message the back-check rolled back).
    pub reason: &'a str,
}

/// The application's database transaction, as the barrier needs it.
pub trait BarrierStore {
    type Error;
    /// Inserts `row` unless its (gid, branch_id, op, barrier_id) exists; true when inserted.
    fn insert_barrier(&mut self, row: &BarrierRow<'_>) -> Result<bool, Self::Error>;
    /// The reason stored for (gid, branch_id, op, barrier_id), if the row exists.
    fn barrier_reason(&mut self, gid: &str, branch_id: &str, op: &str, barrier_id: &str) -> Result<Option<String>, Self::Error>;
}

/// The barrier for one branch call, from the `gid`, `trans_type`, `branch_id` and `op` the
/// coordinator sends in the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchBarrier {
    pub trans_type: String,
    pub gid: String,
    pub branch_id: String,
    pub op: String,
    /// Calls made so far within this branch call (each gets its own barrier id).
    calls: u32,
}

/// Why [`BranchBarrier::call`] did not run the business work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// This call was made before (a retry, or the coordinator's second delivery).
    Repeated,
    /// A compensate or cancel whose forward step never ran here: nothing to undo.
    NullCompensation,
    /// A forward step arriving after its compensation ran: it must not run any more.
    Hanging,
}

impl BranchBarrier {
    pub fn new(trans_type: &str, gid: &str, branch_id: &str, op: &str) -> Self {
        Self { trans_type: trans_type.into(), gid: gid.into(), branch_id: branch_id.into(), op: op.into(), calls: 0 }
    }

    /// From a branch call's query string (`gid=..&trans_type=..&branch_id=..&op=..`).
    pub fn from_query(query: &str) -> Result<Self, ClientError> {
        let pairs: HashMap<String, String> = serde_urlencoded::from_str(query).map_err(|e| ClientError::Decode(format!("barrier query: {e}")))?;
        let get = |k: &str| match pairs.get(k).filter(|v| !v.is_empty()) {
            Some(v) => Ok(v.as_str()),
            None => Err(ClientError::Decode(format!("barrier query: {k} is missing"))),
        };
        Ok(Self::new(get("trans_type")?, get("gid")?, get("branch_id")?, get("op")?))
    }

    /// The barrier for a 2-phase message's local work (`Dtm::prepare`, this, then `submit`).
    pub fn for_message(gid: &str) -> Self {
        Self::new(MSG_OP, gid, MSG_BRANCH, MSG_OP)
    }

    /// Runs `work` unless the barrier says this call must not (see [`Skipped`]). Call it inside
    /// the application's database transaction and commit only on `Ok(Ok(_))` or `Ok(Err(_))`:
    /// the barrier rows belong to the same commit as the work. An `Err` from `work` must roll
    /// back (the barrier rows go with it, so a retry runs again).
    pub fn call<S, T, E>(&mut self, store: &mut S, work: impl FnOnce(&mut S) -> Result<T, E>) -> Result<Result<T, Skipped>, E>
    where
        S: BarrierStore,
        E: From<S::Error>,
    {
        self.calls += 1;
        let barrier_id = format!("{:02}", self.calls);
        let origin = match self.op.as_str() {
            "cancel" => Some("try"),
            "compensate" => Some("action"),
            _ => None,
        };
        let row = |op: &'static str| BarrierRow {
            trans_type: &self.trans_type,
            gid: &self.gid,
            branch_id: &self.branch_id,
            op,
            barrier_id: &barrier_id,
            reason: &self.op,
        };
        // A compensation first takes the forward step's place: if the forward step had not
        // been here, it never will be (hanging-safe) and there is nothing to undo.
        let origin_new = match origin {
            Some(op) => store.insert_barrier(&row(op))?,
            None => false,
        };
        let current = BarrierRow { op: &self.op, ..row("") };
        if !store.insert_barrier(&current)? {
            // The forward step finds its row inserted by a compensation, not by itself: hanging.
            let reason = store.barrier_reason(&self.gid, &self.branch_id, &self.op, &barrier_id)?;
            let hanging = origin.is_none() && reason.as_deref().is_some_and(|r| r != self.op);
            return Ok(Err(if hanging { Skipped::Hanging } else { Skipped::Repeated }));
        }
        if origin_new {
            return Ok(Err(Skipped::NullCompensation));
        }
        work(store).map(Ok)
    }

    /// The back-check of a 2-phase message (`query_prepared`): true if its local work
    /// committed. If it has not, it never will: a rollback row takes its place, so the local
    /// work, arriving late, finds the barrier taken and does nothing.
    pub fn query_prepared<S: BarrierStore>(gid: &str, store: &mut S) -> Result<bool, S::Error> {
        let row = BarrierRow { trans_type: MSG_OP, gid, branch_id: MSG_BRANCH, op: MSG_OP, barrier_id: MSG_BARRIER, reason: ROLLBACK };
        store.insert_barrier(&row)?;
        Ok(store.barrier_reason(gid, MSG_BRANCH, MSG_OP, MSG_BARRIER)?.is_some_and(|r| r != ROLLBACK))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The barrier table in memory, with a transaction's rollback.
    #[derive(Default, Clone)]
    struct Mem(BTreeMap<(String, String, String, String), String>);

    impl BarrierStore for Mem {
        type Error = std::convert::Infallible;
        fn insert_barrier(&mut self, r: &BarrierRow<'_>) -> Result<bool, Self::Error> {
            let key = (r.gid.to_string(), r.branch_id.to_string(), r.op.to_string(), r.barrier_id.to_string());
            if self.0.contains_key(&key) {
                return Ok(false);
            }
            self.0.insert(key, r.reason.to_string());
            Ok(true)
        }
        fn barrier_reason(&mut self, g: &str, b: &str, o: &str, i: &str) -> Result<Option<String>, Self::Error> {
            Ok(self.0.get(&(g.into(), b.into(), o.into(), i.into())).cloned())
        }
    }

    /// The business work's own failure (it rolls the transaction back).
    #[derive(Debug, PartialEq)]
    struct Declined;

    impl From<std::convert::Infallible> for Declined {
        fn from(e: std::convert::Infallible) -> Self {
            match e {}
        }
    }

    /// One handler call in its own transaction: the work counts, a failure rolls back.
    fn run(db: &mut Mem, query: &str, fail: bool, ran: &mut u32) -> Result<Result<(), Skipped>, Declined> {
        let mut tx = db.clone();
        let mut b = BranchBarrier::from_query(query).unwrap();
        let out = b.call(&mut tx, |_| if fail { Err(Declined) } else { Ok(()) });
        if out.is_ok() {
            *db = tx;
        }
        if matches!(out, Ok(Ok(()))) {
            *ran += 1;
        }
        out
    }

    const ACTION: &str = "gid=g1&trans_type=saga&branch_id=01&op=action";
    const COMPENSATE: &str = "gid=g1&trans_type=saga&branch_id=01&op=compensate";

    #[test]
    fn a_repeated_action_runs_once() {
        let (mut db, mut ran) = (Mem::default(), 0);
        assert_eq!(run(&mut db, ACTION, false, &mut ran), Ok(Ok(())));
        assert_eq!(run(&mut db, ACTION, false, &mut ran), Ok(Err(Skipped::Repeated)));
        assert_eq!(ran, 1);
    }

    #[test]
    fn a_failed_action_leaves_no_row_and_its_compensation_is_null() {
        let (mut db, mut ran) = (Mem::default(), 0);
        assert_eq!(run(&mut db, ACTION, true, &mut ran), Err(Declined));
        assert_eq!(run(&mut db, COMPENSATE, false, &mut ran), Ok(Err(Skipped::NullCompensation)));
        assert_eq!(ran, 0);
    }

    #[test]
    fn an_action_after_its_compensation_hangs() {
        let (mut db, mut ran) = (Mem::default(), 0);
        assert_eq!(run(&mut db, COMPENSATE, false, &mut ran), Ok(Err(Skipped::NullCompensation)));
        assert_eq!(run(&mut db, ACTION, false, &mut ran), Ok(Err(Skipped::Hanging)));
        assert_eq!(ran, 0);
    }

    #[test]
    fn a_compensation_after_its_action_runs_once() {
        let (mut db, mut ran) = (Mem::default(), 0);
        run(&mut db, ACTION, false, &mut ran).unwrap().unwrap();
        assert_eq!(run(&mut db, COMPENSATE, false, &mut ran), Ok(Ok(())));
        assert_eq!(run(&mut db, COMPENSATE, false, &mut ran), Ok(Err(Skipped::Repeated)));
        assert_eq!(ran, 2);
    }

    #[test]
    fn a_message_back_check_commits_only_what_committed() {
        let mut db = Mem::default();
        // Committed local work: the back-check says commit.
        let mut b = BranchBarrier::for_message("m1");
        b.call(&mut db, |_| Ok::<_, std::convert::Infallible>(())).unwrap().unwrap();
        assert_eq!(BranchBarrier::query_prepared("m1", &mut db), Ok(true));
        // No local work yet: rolled back, and the late local work is refused.
        assert_eq!(BranchBarrier::query_prepared("m2", &mut db), Ok(false));
        let mut late = BranchBarrier::for_message("m2");
        assert_eq!(late.call(&mut db, |_| Ok::<_, std::convert::Infallible>(())), Ok(Err(Skipped::Hanging)));
        assert_eq!(BranchBarrier::query_prepared("m2", &mut db), Ok(false));
    }

    #[test]
    fn a_query_without_the_branch_fields_is_refused() {
        assert!(BranchBarrier::from_query("gid=g&trans_type=saga&op=action").unwrap_err().to_string().contains("branch_id"));
        assert!(BranchBarrier::from_query("gid=g%201&trans_type=saga&branch_id=01&op=action").is_ok());
    }
}
