//! The audit: checks the invariants of SPEC section 5 against storage and the payment
//! gateway's books, by name, with counts. The database sums the payments and the ledger by
//! kind ([`Reconciliation`]); the rules of what counts as a violation are here.
//!
//! I7 (client and server agree) and I8 (idempotency) need the client's view and are checked by
//! the load generator; everything here is what the server alone can prove.

use serde::Serialize;

use crate::payments::Reconciliation;
use crate::store::StoredCounts;

/// One event's counters and what is wrong with them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventAudit {
    #[serde(flatten)]
    pub counts: StoredCounts,
    /// Confirmed plus held beyond the event's size.
    pub oversold: i64,
    /// Stored `available` minus what the tickets say it should be.
    pub drift: i64,
}

/// Violation counts per invariant; all zero means the run was correct.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Invariants {
    /// I1: tickets confirmed or held beyond total, summed over events.
    #[serde(rename = "I1_no_oversell")]
    pub oversold: i64,
    /// I2: seats sold twice. Seats are unnumbered in v1, so a double sale is a confirmed
    /// ticket beyond capacity.
    #[serde(rename = "I2_no_double_sale")]
    pub double_sold: i64,
    /// I3: confirmed tickets without exactly one net charge, plus unconfirmed ones with any.
    #[serde(rename = "I3_charge_exactly_once")]
    pub charge_mismatches: i64,
    /// I4: tickets still pending.
    #[serde(rename = "I4_no_lost_tickets")]
    pub stuck_pending: i64,
    /// I5: charges with no payment record, and payments not in a final state.
    #[serde(rename = "I5_no_lost_payments")]
    pub lost_payments: i64,
    /// I6: events whose stored `available` disagrees with their tickets.
    #[serde(rename = "I6_conservation")]
    pub drifting_events: i64,
}

impl Invariants {
    pub fn all_hold(&self) -> bool {
        *self == Self::default()
    }
}

/// Work still under way, counted when the audit was taken. The system is *quiet* when every
/// count is zero: only then can I3, I4 and I5 be judged, since a payment in flight (a late
/// success still to be refunded, say) is not yet a violation.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    /// Tickets stored `pending`.
    pub pending_tickets: i64,
    /// Orders stored `pending`.
    pub pending_orders: i64,
    /// Seats held in the stage's memory (the event actors'); stages that keep holds in storage
    /// count them as pending tickets.
    pub held_seats: i64,
    /// Payments begun at the simulated gateway and not yet settled by the stage (a charge or
    /// refund on the wire, or a charge's answer not yet written).
    pub payments_in_flight: i64,
    /// Payment jobs queued or waiting out a backoff (`locked`).
    pub jobs_queued: i64,
    /// Payment jobs a worker is running (`locked`).
    pub jobs_running: i64,
    /// Writes handed to the group-commit writer and not yet committed.
    pub unflushed_writes: i64,
    /// Purchases the stage is running (counted by the `monolith`, whose pending rows are its
    /// only other trace of them; the other stages' work shows as held seats, payments in
    /// flight and jobs).
    pub purchases_running: i64,
    /// True when the stage runs nothing that could still settle its pending rows: the
    /// `monolith` with no purchase running, since it never takes up a purchase it lost (a
    /// crash, a hung-up client). Its pending rows are then lost tickets (I4), not work under
    /// way, and do not keep the system from being quiet.
    pub pending_stranded: bool,
    /// Bumped by the stage each time it starts work; two reads with the same value saw none
    /// start in between (see `pending_stranded`). Not reported.
    #[serde(skip)]
    pub work_started: u64,
    /// What could not be counted (e.g. the queue, with Redis down); anything here means not quiet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
}

impl Activity {
    /// Nothing under way and everything counted. Stranded pending rows are not under way.
    pub fn is_quiet(&self) -> bool {
        let pending = if self.pending_stranded {
            0
        } else {
            self.pending_tickets + self.pending_orders
        };
        self.unreadable.is_empty()
            && [
                pending,
                self.held_seats,
                self.payments_in_flight,
                self.jobs_queued,
                self.jobs_running,
                self.unflushed_writes,
                self.purchases_running,
            ]
            .iter()
            .all(|n| *n == 0)
    }
}

/// The audit's conclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Quiet, and every invariant holds.
    Pass,
    /// Quiet, and some invariant is violated.
    Fail,
    /// Work is still under way ([`Activity`]): the counts are a snapshot, not a verdict.
    NotQuiet,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditReport {
    /// The invariants' counts are all zero (conclusive only when `quiet`; see `verdict`).
    pub ok: bool,
    /// Nothing is under way ([`Activity`] all zero).
    pub quiet: bool,
    pub verdict: Verdict,
    pub activity: Activity,
    pub invariants: Invariants,
    pub events: Vec<EventAudit>,
    /// Lines in the gateway's ledger: every charge, decline and refund on this database.
    pub ledger_entries: i64,
    pub double_charged: i64,
    pub charged_not_confirmed: i64,
    pub confirmed_not_charged: i64,
    pub unrecorded_charges: i64,
    pub unsettled_payments: i64,
}

/// Audits stored counts, and the payments against the gateway's books (everything it ever
/// charged on this database, in this run or an earlier one), summed by the database.
/// `activity` is what was under way meanwhile: the verdict is `not-quiet` unless it is none.
pub fn audit(counts: &[StoredCounts], books: &Reconciliation, activity: Activity) -> AuditReport {
    let events: Vec<EventAudit> = counts
        .iter()
        .map(|c| EventAudit {
            counts: *c,
            oversold: (c.confirmed + c.pending - c.total).max(0),
            drift: c.available - (c.total - c.confirmed - c.pending),
        })
        .collect();

    let (mut double_charged, mut charged_not_confirmed, mut confirmed_not_charged) = (0, 0, 0);
    let mut unsettled = 0;
    for class in &books.classes {
        let n = class.payments;
        if class.payment_status == "pending" {
            unsettled += n;
        }
        let net = class.net_charges.unwrap_or(0);
        if net > 1 {
            double_charged += n;
        } else if class.order_confirmed {
            if net != 1 || class.payment_status != "completed" {
                confirmed_not_charged += n;
            }
        } else if net != 0 {
            charged_not_confirmed += n;
        }
    }

    let invariants = Invariants {
        oversold: events.iter().map(|e| e.oversold).sum(),
        double_sold: events
            .iter()
            .map(|e| (e.counts.confirmed - e.counts.total).max(0))
            .sum(),
        charge_mismatches: double_charged + charged_not_confirmed + confirmed_not_charged,
        stuck_pending: events.iter().map(|e| e.counts.pending).sum(),
        lost_payments: books.unrecorded_keys + unsettled,
        drifting_events: events.iter().filter(|e| e.drift != 0).count() as i64,
    };
    let ok = invariants.all_hold();
    let quiet = activity.is_quiet();
    AuditReport {
        ok,
        quiet,
        verdict: match (quiet, ok) {
            (false, _) => Verdict::NotQuiet,
            (true, true) => Verdict::Pass,
            (true, false) => Verdict::Fail,
        },
        activity,
        invariants,
        events,
        ledger_entries: books.ledger_entries,
        double_charged,
        charged_not_confirmed,
        confirmed_not_charged,
        unrecorded_charges: books.unrecorded_keys,
        unsettled_payments: unsettled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventId;
    use crate::store::gateway::PaymentClass;

    fn class(confirmed: bool, status: &str, net: Option<i64>, payments: i64) -> PaymentClass {
        PaymentClass {
            order_confirmed: confirmed,
            payment_status: status.into(),
            net_charges: net,
            payments,
        }
    }

    fn sold(confirmed: i64) -> StoredCounts {
        StoredCounts {
            event: EventId(1),
            total: 10,
            available: 10 - confirmed,
            confirmed,
            pending: 0,
            cancelled: 0,
        }
    }

    #[test]
    fn a_quiet_run_with_one_charge_per_confirmed_order_passes() {
        let books = Reconciliation {
            classes: vec![
                class(true, "completed", Some(1), 7),
                class(false, "failed", Some(0), 2),
                class(false, "refunded", Some(0), 1),
                class(false, "failed", None, 3),
            ],
            unrecorded_keys: 0,
            ledger_entries: 11,
        };
        let report = audit(&[sold(7)], &books, Activity::default());
        assert!(report.ok, "{report:?}");
        assert_eq!(report.verdict, Verdict::Pass);
        assert_eq!(report.ledger_entries, 11);
    }

    #[test]
    fn every_charge_mismatch_counts_once_per_payment() {
        let books = Reconciliation {
            classes: vec![
                class(true, "completed", Some(1), 5),
                // confirmed but the gateway never charged it, or charged and refunded it
                class(true, "completed", None, 2),
                class(true, "completed", Some(0), 1),
                // charged, then the order was cancelled without a refund
                class(false, "failed", Some(1), 3),
                // charged twice
                class(true, "completed", Some(2), 4),
            ],
            unrecorded_keys: 0,
            ledger_entries: 0,
        };
        let report = audit(&[sold(7)], &books, Activity::default());
        assert_eq!(report.confirmed_not_charged, 3);
        assert_eq!(report.charged_not_confirmed, 3);
        assert_eq!(report.double_charged, 4);
        assert_eq!(report.invariants.charge_mismatches, 10);
        assert!(!report.ok);
    }

    #[test]
    fn charges_no_payment_explains_and_unsettled_payments_are_lost_payments() {
        let books = Reconciliation {
            classes: vec![class(false, "pending", None, 2)],
            unrecorded_keys: 3,
            ledger_entries: 3,
        };
        let report = audit(&[sold(0)], &books, Activity::default());
        assert_eq!(report.unrecorded_charges, 3);
        assert_eq!(report.unsettled_payments, 2);
        assert_eq!(report.invariants.lost_payments, 5);
    }

    #[test]
    fn a_late_charge_in_flight_is_not_quiet_rather_than_a_violation() {
        // A hold expired while its charge was on the wire: the ledger has the charge, the
        // payment is still pending, the refund has not happened yet.
        let books = Reconciliation {
            classes: vec![class(false, "pending", Some(1), 1)],
            unrecorded_keys: 0,
            ledger_entries: 1,
        };
        let activity = Activity {
            payments_in_flight: 1,
            ..Activity::default()
        };
        let report = audit(&[sold(0)], &books, activity);
        assert!(!report.quiet);
        assert_eq!(report.verdict, Verdict::NotQuiet);
        // the same books once quiet are a violation
        let report = audit(&[sold(0)], &books, Activity::default());
        assert_eq!(report.verdict, Verdict::Fail);
    }

    #[test]
    fn anything_uncounted_is_not_quiet() {
        let mut activity = Activity::default();
        assert!(activity.is_quiet());
        activity.unreadable.push("payment queue".into());
        assert!(!activity.is_quiet());
        for field in 0..8 {
            let mut a = Activity::default();
            *[
                &mut a.pending_tickets,
                &mut a.pending_orders,
                &mut a.held_seats,
                &mut a.payments_in_flight,
                &mut a.jobs_queued,
                &mut a.jobs_running,
                &mut a.unflushed_writes,
                &mut a.purchases_running,
            ][field] = 1;
            assert!(!a.is_quiet(), "field {field}");
        }
    }

    #[test]
    fn stranded_pending_rows_are_quiet_and_a_verdict_on_lost_tickets() {
        // the monolith after a crash: rows pending, nothing running that could settle them
        let mut counts = sold(0);
        counts.pending = 3;
        counts.available -= 3;
        let stranded = Activity {
            pending_tickets: 3,
            pending_orders: 3,
            pending_stranded: true,
            ..Activity::default()
        };
        let report = audit(&[counts], &Reconciliation::default(), stranded.clone());
        assert!(report.quiet);
        assert_eq!(report.verdict, Verdict::Fail);
        assert_eq!(report.invariants.stuck_pending, 3);
        // the same rows while a purchase runs are work under way
        let running = Activity {
            purchases_running: 1,
            pending_stranded: false,
            ..stranded
        };
        let report = audit(&[counts], &Reconciliation::default(), running);
        assert_eq!(report.verdict, Verdict::NotQuiet);
    }
}
