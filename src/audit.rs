//! The audit: checks the invariants of SPEC section 5 against storage and the payment
//! gateway's ledger, by name, with counts.
//!
//! I7 (client and server agree) and I8 (idempotency) need the client's view and are checked by
//! the load generator; everything here is what the server alone can prove.

use std::collections::HashMap;

use serde::Serialize;

use crate::payments::{LedgerEntry, LedgerKind};
use crate::store::{PaymentRecord, StoredCounts};

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

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditReport {
    pub ok: bool,
    pub invariants: Invariants,
    pub events: Vec<EventAudit>,
    /// Ledger lines read (this server process's gateway).
    pub ledger_entries: usize,
    pub double_charged: i64,
    pub charged_not_confirmed: i64,
    pub confirmed_not_charged: i64,
    pub unrecorded_charges: i64,
    pub unsettled_payments: i64,
}

/// Audits stored counts and payments against the gateway ledger.
///
/// The simulated gateway lives in the server process, so its ledger covers this process only:
/// payments it has never seen (settled by an earlier process) are not reconciled against it.
pub fn audit(
    counts: &[StoredCounts],
    payments: &[PaymentRecord],
    ledger: &[LedgerEntry],
) -> AuditReport {
    let events: Vec<EventAudit> = counts
        .iter()
        .map(|c| EventAudit {
            counts: *c,
            oversold: (c.confirmed + c.pending - c.total).max(0),
            drift: c.available - (c.total - c.confirmed - c.pending),
        })
        .collect();

    // net successful charges per key, as the gateway saw them
    let mut net: HashMap<&str, i64> = HashMap::new();
    for entry in ledger {
        let delta = match entry.kind {
            LedgerKind::Charge => 1,
            LedgerKind::Refund => -1,
            LedgerKind::Decline => 0,
        };
        *net.entry(entry.key.as_str()).or_default() += delta;
    }

    let (mut double_charged, mut charged_not_confirmed, mut confirmed_not_charged) = (0, 0, 0);
    let mut unsettled = 0;
    for p in payments {
        if p.status == "pending" {
            unsettled += 1;
        }
        let confirmed = p.order_status == "confirmed";
        if confirmed && p.status != "completed" {
            confirmed_not_charged += 1;
        }
        let Some(&charges) = net.get(p.key.as_str()) else {
            continue;
        };
        match (confirmed, charges) {
            (_, n) if n > 1 => double_charged += 1,
            (true, 0) => confirmed_not_charged += 1,
            (false, n) if n != 0 => charged_not_confirmed += 1,
            _ => {}
        }
    }
    let recorded: std::collections::HashSet<&str> =
        payments.iter().map(|p| p.key.as_str()).collect();
    let unrecorded = net.keys().filter(|key| !recorded.contains(*key)).count() as i64;

    let invariants = Invariants {
        oversold: events.iter().map(|e| e.oversold).sum(),
        double_sold: events
            .iter()
            .map(|e| (e.counts.confirmed - e.counts.total).max(0))
            .sum(),
        charge_mismatches: double_charged + charged_not_confirmed + confirmed_not_charged,
        stuck_pending: events.iter().map(|e| e.counts.pending).sum(),
        lost_payments: unrecorded + unsettled,
        drifting_events: events.iter().filter(|e| e.drift != 0).count() as i64,
    };
    AuditReport {
        ok: invariants.all_hold(),
        invariants,
        events,
        ledger_entries: ledger.len(),
        double_charged,
        charged_not_confirmed,
        confirmed_not_charged,
        unrecorded_charges: unrecorded,
        unsettled_payments: unsettled,
    }
}
