//! Stage `monolith`: the seed's step 1, racy on purpose.
//!
//! Read availability, create a pending ticket, wait for the slow payment, confirm, then write
//! back `available = value_read - 1`. Each step is its own autocommit statement; nothing locks
//! the event and no transaction spans the whole. Concurrent buyers all read the same
//! `available`, all pass the check, all get confirmed (oversell) and all write back the same
//! value (lost update). That is the lesson this stage exists to teach; do not fix it here.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::{PurchaseError, Stage, StageParts};
use crate::audit::Activity;
use crate::config::StageKind;
use chrono::Utc;

use crate::domain::{
    timestamp, CancelReason, Event, EventId, NewEvent, OrderId, Ticket, TicketId, UserId,
};
use crate::payments::ChargeOutcome;
use crate::store::{Catalog, NewOrder, Records, StoreError};

pub struct Monolith {
    parts: StageParts,
    work: Arc<Work>,
}

/// Purchases running, and purchases ever started: the audit's view of what the monolith has
/// under way (it has no recovery, so a pending row no running purchase owns is lost).
#[derive(Default)]
struct Work {
    running: AtomicI64,
    started: AtomicU64,
}

/// Counts one purchase as running until dropped (finished, failed, or cut short).
struct Running(Arc<Work>);

impl Running {
    fn start(work: &Arc<Work>) -> Self {
        work.started.fetch_add(1, Ordering::AcqRel);
        work.running.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(work))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Monolith {
    pub fn new(parts: StageParts) -> Self {
        Self {
            parts,
            work: Arc::default(),
        }
    }
}

#[async_trait]
impl Stage for Monolith {
    fn kind(&self) -> StageKind {
        StageKind::Monolith
    }

    fn records(&self) -> &dyn Records {
        &self.parts.store
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        self.parts.store.create_event(&new).await
    }

    async fn activity(&self) -> Activity {
        // `started` first: a purchase starting after this read changes it, which the audit
        // checks before calling pending rows stranded
        let started = self.work.started.load(Ordering::Acquire);
        let running = self.work.running.load(Ordering::Acquire);
        Activity {
            purchases_running: running,
            pending_stranded: running == 0,
            work_started: started,
            ..Activity::default()
        }
    }

    #[tracing::instrument(skip(self), fields(stage = "monolith"))]
    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        let _running = Running::start(&self.work);
        if self.parts.settings.purchase_transaction {
            // its own task: a client hanging up must not cut a transaction short
            let parts = self.parts.clone();
            let running = Running::start(&self.work);
            return tokio::spawn(async move {
                let _running = running;
                purchase_in_one_transaction(&parts, event, user).await
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("the purchase task failed: {e}")))?;
        }
        let store = &self.parts.store;
        // 1. check availability (the race starts here)
        let (available, price) = store
            .read_availability(event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        if available <= 0 {
            return Err(PurchaseError::SoldOut);
        }
        // 2. create a pending ticket (an order of one, with its payment)
        let order = OrderId(Uuid::new_v4());
        let pending = NewOrder {
            order,
            tickets: vec![TicketId(Uuid::new_v4())],
            event,
            user: user.as_str().to_owned(),
            unit_price: price,
            idempotency: None,
            created_at: timestamp(Utc::now()),
        };
        store.insert_pending_order(&pending).await?;
        // 3. the slow payment, while other buyers read the same `available`
        let _in_flight = self.parts.payments.track();
        match self
            .parts
            .payments
            .charge(&pending.payment_key(), price)
            .await?
        {
            ChargeOutcome::Approved { .. } => {
                // 4. confirm, then write back what was read minus one (the lost update)
                store.confirm_order(order).await?;
                store.write_available(event, available - 1).await?;
                store
                    .first_ticket(order)
                    .await?
                    .ok_or_else(|| StoreError::Conflict("confirmed ticket vanished".into()).into())
            }
            ChargeOutcome::Declined => {
                store
                    .cancel_order(order, CancelReason::PaymentDeclined)
                    .await?;
                Err(PurchaseError::PaymentDeclined)
            }
        }
    }
}

/// `--purchase-transaction`: the same steps inside one `BEGIN IMMEDIATE` … `COMMIT`, held
/// across the payment. No race is left (the check and the write-back are one transaction, and
/// the write-back decrements what is stored), but on SQLite every other purchase waits for the
/// file's write lock until the payment is over, or gives up after `--sqlite-busy-timeout` with
/// `database is locked`.
async fn purchase_in_one_transaction(
    parts: &StageParts,
    event: EventId,
    user: UserId,
) -> Result<Ticket, PurchaseError> {
    let mut tx = parts.store.begin_write().await?;
    let outcome = async {
        let (available, price) = tx
            .read_availability(event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        if available <= 0 {
            return Err(PurchaseError::SoldOut);
        }
        let order = OrderId(Uuid::new_v4());
        let pending = NewOrder {
            order,
            tickets: vec![TicketId(Uuid::new_v4())],
            event,
            user: user.as_str().to_owned(),
            unit_price: price,
            idempotency: None,
            created_at: timestamp(Utc::now()),
        };
        tx.insert_pending_order(&pending).await?;
        match parts.payments.charge(&pending.payment_key(), price).await? {
            ChargeOutcome::Approved { .. } => {
                tx.confirm_and_take_seat(order, event).await?;
                tx.first_ticket(order)
                    .await?
                    .ok_or_else(|| StoreError::Conflict("confirmed ticket vanished".into()).into())
            }
            ChargeOutcome::Declined => {
                tx.cancel_order(order, CancelReason::PaymentDeclined)
                    .await?;
                Err(PurchaseError::PaymentDeclined)
            }
        }
    }
    .await;
    match outcome {
        Ok(ticket) => {
            tx.commit().await?;
            Ok(ticket)
        }
        Err(PurchaseError::PaymentDeclined) => {
            tx.commit().await?;
            Err(PurchaseError::PaymentDeclined)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}
